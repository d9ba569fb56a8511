//! deadlines: the bounds a connection is held to while it opens (a ClientHello's, a TLS
//! handshake's, a HELLO's, a gateway connect's, a wait in the handshake line), kept in the
//! timer wheel of a thread of their own (`wasmbed-timers`) rather than in the runtime the
//! sessions run on.
//!
//! Why: tokio's runtime reads the clock and walks its wheel on every park when the wheel
//! holds a timer, and wakes its own driver (an `eventfd` write) when a new timer is the
//! earliest. Every connection arms one or two such bounds, almost all of them cancelled
//! within a millisecond. Kept in the data plane's wheel, they made each wake-up of a
//! passthrough session's runtime dearer; with nothing there, its parks skip the wheel (the
//! figures: docs/performance.md, "Deadlines on a thread of their own"). A deadline
//! registered from here takes the timer thread's lock for a moment and, when it is longer
//! than that thread's floor ([`hold_floor`]: an entry always armed at half the shorter
//! timeout), does not wake it. The rare deadline that expires wakes its session from that
//! thread, as a gateway's cut does.
//!
//! The data plane's other waits are armed here too ([`Deadlines::sleep`]: the accept loop's
//! back-off, the stop's grace, a takeover's steps), so that a passthrough proxy's data plane
//! runs with no time driver at all ([`data_plane_timers`]). What stays in the data plane's
//! wheel, in terminate mode (which keeps one): a terminated session's own timer and its
//! close's bound, quinn's (QUIC devices, the link) and the link's keep-alive, the
//! rebalancer's tick.

#![expect(
    clippy::disallowed_methods,
    reason = "the timers made here are armed on the timer thread, or in the runtime a test gives"
)]

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::error::Elapsed;
use tokio::time::{Instant, Timeout};
use tokio_util::sync::{CancellationToken, DropGuard};

/// Where deadlines are armed: the timer thread ([`Deadlines::start`], what a proxy uses), or
/// (`Deadlines::default()`, for tests) the runtime current where each is armed.
#[derive(Clone, Default)]
pub struct Deadlines(Option<Arc<Timers>>);

/// The timer thread: its runtime's handle, and its stop. The thread ends (and drops its
/// runtime there: a runtime may not be dropped inside another) when the last clone of its
/// [`Deadlines`] is dropped, after every session that could arm a deadline on it.
struct Timers {
    handle: Handle,
    _stop: DropGuard,
}

impl Deadlines {
    /// A thread of their own whose wheel always holds an entry at most `floor` ahead
    /// ([`floor_period`]: shorter than the connection timeouts, so that arming their bounds
    /// does not wake it). Returns once that entry is armed.
    pub async fn start(floor: Duration) -> std::io::Result<Deadlines> {
        let stop = CancellationToken::new();
        let until = stop.clone();
        let (armed, floored) = tokio::sync::oneshot::channel();
        let handle = crate::control::runtime_thread(
            "wasmbed-timers",
            tokio::runtime::Builder::enable_time,
            move || hold_floor(floor, until, armed),
        )?;
        floored
            .await
            .map_err(|_| std::io::Error::other("the timer thread ended at its start"))?;
        Ok(Deadlines(Some(Arc::new(Timers {
            handle,
            _stop: stop.drop_guard(),
        }))))
    }

    /// `future`, bounded by `deadline` (as `tokio::time::timeout_at`).
    pub fn timeout_at<F: IntoFuture>(
        &self,
        deadline: Instant,
        future: F,
    ) -> Bounded<'_, F::IntoFuture> {
        self.bound(|| tokio::time::timeout_at(deadline, future))
    }

    /// `future`, bounded by `within` from now (as `tokio::time::timeout`).
    pub fn timeout<F: IntoFuture>(
        &self,
        within: Duration,
        future: F,
    ) -> Bounded<'_, F::IntoFuture> {
        self.bound(|| tokio::time::timeout(within, future))
    }

    /// Waits `within` (as `tokio::time::sleep`), armed where these deadlines are: what the
    /// data plane's waits that are not a connection's bound use (the accept loop's back-off,
    /// the stop's grace, a takeover's), so that a passthrough proxy's data plane needs no
    /// time driver at all ([`data_plane_timers`]).
    pub async fn sleep(&self, within: Duration) {
        let _ = self.timeout(within, std::future::pending::<()>()).await;
    }

    /// The bound `make` returns, made where these deadlines are armed: a timer belongs to
    /// the runtime current where it is made.
    fn bound<F>(&self, make: impl FnOnce() -> Timeout<F>) -> Bounded<'_, F> {
        let _on = self.0.as_ref().map(|t| t.handle.enter());
        Bounded {
            timeout: make(),
            _on: PhantomData,
        }
    }
}

pin_project_lite::pin_project! {
    /// A future bounded by a deadline armed through [`Deadlines`]: tokio's `Timeout`, which
    /// borrows the `Deadlines` (no bigger for it) so that the timer thread cannot end, and
    /// shut its wheel down under an armed deadline (a panic in tokio), while it waits.
    pub struct Bounded<'a, F> {
        #[pin]
        timeout: Timeout<F>,
        _on: PhantomData<&'a Deadlines>,
    }
}

impl<F: Future> Future for Bounded<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().timeout.poll(cx)
    }
}

/// Whether the runtime the sessions run on needs a time driver of its own under `config`.
///
/// Why it matters: a runtime with a time driver reads the clock and locks its wheel on every
/// park, empty wheel or not: 2.5k instructions per TLS passthrough connection on tokio's own
/// floor (docs/performance.md, "A data plane without a time driver"). In passthrough mode
/// every timer the data plane waits on is armed here ([`Deadlines`]) or runs on a control
/// thread (probes, discovery, the dashboard), so the runtime can do without one. Terminated
/// sessions keep timers of their own (the anchor's), and quinn arms its timers in the runtime
/// its endpoint runs on (QUIC devices, the link: both need terminate mode, checked here all
/// the same): with either, the data plane keeps one. All are fixed at start (a reload keeps
/// `mode`, `--quic-listen` and `--upstream`). Every other timer in this crate is a
/// `clippy::disallowed_methods` exception that says where it runs (`proxy/clippy.toml`).
pub fn data_plane_timers(config: &wasmbed_config::ProxyConfig) -> bool {
    config.mode == wasmbed_config::Mode::Terminate
        || config.quic.listen.is_some()
        || config.upstream == wasmbed_config::proxy::UpstreamMode::Link
}

/// How far ahead [`hold_floor`] keeps an entry: half the shortest connection bound (the
/// ClientHello's or TLS handshake's, the gateway connect's), at least 50 ms and at most 1 s.
pub(crate) fn floor_period(config: &wasmbed_config::ProxyConfig) -> Duration {
    (config.handshake_timeout.min(config.connect_timeout) / 2)
        .clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Keeps one timer always armed at most `period` ahead, until `stop`.
///
/// Why: when a new timer is the earliest in tokio's wheel, tokio wakes the wheel's driver to
/// recompute its sleep: here a wake-up of the timer thread from the session's thread for
/// every connection (seen with `strace` at 600 TLS passthrough connections/s when these
/// deadlines were in the data plane's wheel: 1.03 `eventfd` writes per connection). With an
/// entry always nearer than any deadline, a new one is never the earliest; the floor costs
/// the timer thread `1 / period` wake-ups a second.
pub(crate) async fn hold_floor(
    period: Duration,
    stop: CancellationToken,
    armed: tokio::sync::oneshot::Sender<()>,
) {
    let mut next = std::pin::pin!(tokio::time::sleep(period));
    // A timer enters the wheel at its first poll.
    std::future::poll_fn(|cx| {
        let _ = next.as_mut().poll(cx);
        Poll::Ready(())
    })
    .await;
    let _ = armed.send(());
    loop {
        tokio::select! {
            _ = next.as_mut() => next.as_mut().reset(Instant::now() + period),
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::Poll;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::{Deadlines, hold_floor};

    /// Write-type system calls made by this thread so far (Linux's per-task I/O accounting).
    fn writes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines()
            .find_map(|l| l.strip_prefix("syscw: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("syscw in /proc/thread-self/io")
    }

    /// Write-type system calls this thread makes arming a connection-like deadline (30 s)
    /// through `deadlines`: after one short sleep, so that the runtime has parked and knows
    /// its next wake-up.
    async fn writes_arming(deadlines: &Deadlines) -> u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let before = writes();
        let mut bounded = std::pin::pin!(
            deadlines.timeout(Duration::from_secs(30), std::future::pending::<()>())
        );
        std::future::poll_fn(|cx| {
            let _ = bounded.as_mut().poll(cx);
            Poll::Ready(())
        })
        .await;
        writes() - before
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Armed in a runtime's own (empty) wheel, a deadline makes the runtime wake itself (an
    /// `eventfd` write); with [`hold_floor`] in that wheel it does not (the floor 10 s ahead: a
    /// host stalled past it would find the wheel empty again); armed on the timer thread (its
    /// wheel floored so) it touches neither the session's wheel nor its thread.
    #[test]
    fn a_deadline_on_the_timer_thread_wakes_nothing() {
        runtime().block_on(async {
            let here = writes_arming(&Deadlines::default()).await;
            assert!(here >= 1, "in the session's own wheel: {here} writes");

            let stop = CancellationToken::new();
            let (armed, floored) = tokio::sync::oneshot::channel();
            tokio::spawn(hold_floor(Duration::from_secs(10), stop.clone(), armed));
            floored.await.expect("the floor is armed");
            let with_floor = writes_arming(&Deadlines::default()).await;
            stop.cancel();
            assert_eq!(
                with_floor, 0,
                "with a floor in the wheel: {with_floor} writes"
            );

            let thread = Deadlines::start(Duration::from_secs(10))
                .await
                .expect("timer thread");
            let there = writes_arming(&thread).await;
            assert_eq!(there, 0, "on the timer thread: {there} writes");
        });
    }

    /// A deadline that expires on the timer thread ends the future it bounds, on the session's
    /// runtime; one that does not leaves the future's output.
    #[test]
    fn a_deadline_on_the_timer_thread_expires_and_wakes_its_session() {
        runtime().block_on(async {
            let deadlines = Deadlines::start(Duration::from_secs(1))
                .await
                .expect("timer thread");
            // Bounded on this runtime too: a lost wake-up fails the test rather than hangs it.
            let expired = tokio::time::timeout(
                Duration::from_secs(10),
                deadlines.timeout(Duration::from_millis(20), std::future::pending::<()>()),
            )
            .await
            .expect("the expired deadline woke its session");
            assert!(expired.is_err(), "a pending future outlived its deadline");
            let at = tokio::time::Instant::now() + Duration::from_secs(30);
            let done = deadlines.timeout_at(at, async { 7 }).await;
            assert_eq!(done.ok(), Some(7));
        });
    }

    #[test]
    fn the_floor_is_nearer_than_the_connection_bounds() {
        let mut config =
            wasmbed_config::ProxyConfig::from_toml("[[gateway]]\naddr = \"127.0.0.1:1\"")
                .expect("config");
        let period = super::floor_period(&config);
        assert!(period < config.connect_timeout && period < config.handshake_timeout);
        config.connect_timeout = Duration::from_millis(10);
        assert_eq!(super::floor_period(&config), Duration::from_millis(50));
    }
}
