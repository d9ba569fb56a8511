//! The session workers: with more than one thread, TCP device sessions run on `threads`
//! one-thread runtimes, each on a thread of its own, rather than on one work-stealing runtime.
//!
//! Why: a session's sockets are registered with the runtime that serves it, and its
//! wake-ups are handled where they arrive, as in NGINX's and HAProxy's workers, Envoy's
//! worker dispatchers and Pingora's runtimes without stealing. tokio's multi-thread scheduler
//! costs a session more at every turn of its loop than the one-thread scheduler: its
//! workers' search for tasks to steal, and its per-batch statistics (an exponentially
//! weighted average of poll times, a floating-point power per batch). Measured: 0.81× the
//! user-mode instructions per TLS passthrough connection on one-thread runtimes
//! (docs/performance.md, "Session workers"). And a one-thread runtime lets a session skip
//! the direction with nothing new (`forward::Tcp`), which a multi-thread runtime cannot.
//!
//! Each listener's accept loop runs on a worker (the workers in turn). A connection it accepts
//! is served there, or, when another worker has fewer sessions, moved to that one before its
//! session starts (taken out of one worker's epoll set and put in the other's: two system
//! calls); a session stays on its worker for its life. A session is one task (a terminated
//! one two, for a moment), so a worker's load is its live tasks but for those that are not
//! sessions: its accept loops, and its link lane's tasks (each holds a [`Counted`] in the worker's `others`).
//! QUIC devices stay on the main runtime: quinn's endpoint is one task that every one of its
//! connections' datagrams passes through. For the same reason each worker has links of its
//! own to the gateways (`link::Links`, a lane per worker, found by [`current`]): a session's
//! link stream is driven where the session is.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Builder, Handle, RuntimeMetrics};
use tokio_util::sync::CancellationToken;

use crate::control::runtime_thread;
use crate::events::Counted;

thread_local! {
    /// On a worker's thread, its place among the workers.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker this thread is (its place among the workers), if it is one.
pub(crate) fn current() -> Option<usize> {
    WORKER.with(Cell::get)
}

/// How many threads serve sessions: `threads`, or every core this process may run on.
pub fn threads(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// One-thread runtimes serving sessions; their threads end when this is dropped (a task still
/// on one is dropped with it).
pub(crate) struct Workers {
    workers: Vec<Worker>,
    stop: CancellationToken,
}

/// One worker: its runtime, and what its load is read from.
struct Worker {
    handle: Handle,
    /// Its live tasks are read here: kept, since `Handle::metrics` clones the handle (an
    /// atomic add and subtract on a count other threads share) at every call, that is at every
    /// connection's placement.
    metrics: RuntimeMetrics,
    /// Its live tasks that are not sessions: the accept loops it runs
    /// ([`Workers::host_loop`]) and its link lane's tasks (each holding a [`Counted`] in it).
    others: Arc<AtomicUsize>,
}

impl Worker {
    /// Its sessions: its live tasks but for those that are not sessions.
    fn load(&self) -> usize {
        let tasks = self.metrics.num_alive_tasks();
        tasks.saturating_sub(self.others.load(Ordering::Relaxed))
    }
}

/// Where a connection accepted by a listener's loop is served.
pub(crate) enum Placed<'a> {
    /// On the worker that accepted it.
    Here,
    /// On another: moved there (`listener::Accepted::moved_to`).
    Away(&'a Handle),
}

impl Workers {
    /// `n` workers (threads `wasmbed-w-0`, ...: a thread's name in the kernel is at most 15
    /// bytes), with a time driver when `timers` (the data plane's,
    /// `deadlines::data_plane_timers`).
    pub(crate) fn start(n: usize, timers: bool) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let enable: fn(&mut Builder) -> &mut Builder = if timers {
            Builder::enable_all
        } else {
            Builder::enable_io
        };
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let until = stop.clone();
            let started = runtime_thread(&format!("wasmbed-w-{i}"), enable, move || {
                // Called on the worker's thread, before its runtime runs anything.
                WORKER.with(|w| w.set(Some(i)));
                async move { until.cancelled().await }
            });
            match started {
                Ok(handle) => workers.push(Worker {
                    metrics: handle.metrics(),
                    handle,
                    others: Arc::default(),
                }),
                Err(e) => {
                    // The threads already started end.
                    stop.cancel();
                    return Err(e);
                }
            }
        }
        Ok(Workers { workers, stop })
    }

    /// Where listener `i`'s accept loop is to run (the workers in turn), and the mark it is
    /// to hold for its life: a task there that is not a session.
    pub(crate) fn host_loop(&self, listener: usize) -> (&Handle, Counted) {
        let w = &self.workers[listener % self.workers.len()];
        (&w.handle, Counted::new(&w.others))
    }

    /// Where a connection accepted by listener `i`'s loop is served: the worker with the
    /// fewest sessions ([`Worker::load`]), the one that accepted it on a tie (a move costs two
    /// system calls).
    pub(crate) fn place(&self, listener: usize) -> Placed<'_> {
        let here = listener % self.workers.len();
        match self.fewest(here) {
            w if w == here => Placed::Here,
            w => Placed::Away(&self.workers[w].handle),
        }
    }

    /// The worker with the fewest sessions (a session a takeover hands over goes there).
    pub(crate) fn least(&self) -> &Handle {
        &self.workers[self.fewest(0)].handle
    }

    /// The worker with the fewest sessions, `first` on a tie.
    fn fewest(&self, first: usize) -> usize {
        let (mut best, mut least) = (first, self.workers[first].load());
        for w in (0..self.workers.len()).filter(|&w| w != first) {
            let l = self.workers[w].load();
            if l < least {
                (best, least) = (w, l);
            }
        }
        best
    }

    /// The workers' runtimes, in order, each with the count its tasks that are not sessions
    /// are to be counted in (each holding a [`Counted`] in it).
    pub(crate) fn homes(&self) -> impl Iterator<Item = (Handle, Arc<AtomicUsize>)> + '_ {
        self.workers
            .iter()
            .map(|w| (w.handle.clone(), w.others.clone()))
    }

    /// Each worker's sessions now, in order (`wasmbed_proxy_worker_sessions`).
    pub(crate) fn sessions(&self) -> Vec<usize> {
        self.workers.iter().map(Worker::load).collect()
    }

    /// Live tasks on each worker, in order.
    #[cfg(test)]
    fn loads(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.metrics.num_alive_tasks())
            .collect()
    }

    /// Stops the workers when dropped (their tasks are dropped with their runtimes), even
    /// while clones of them are held (by their accept loops).
    pub(crate) fn stop_guard(&self) -> tokio_util::sync::DropGuard {
        self.stop.clone().drop_guard()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use tokio::sync::oneshot;

    use super::*;

    /// Sent when dropped: the task holding it ended or was dropped.
    struct Dropped(mpsc::Sender<()>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }

    /// Waits (bounded) until the workers' live tasks are `want`: a task's end is counted as
    /// its worker releases it, just after its `JoinHandle` learns of it, and nothing signals it.
    fn loads_become(workers: &Workers, want: &[usize]) {
        let since = Instant::now();
        while workers.loads() != want {
            assert!(
                since.elapsed() < Duration::from_secs(10),
                "loads {:?}, not {want:?}",
                workers.loads()
            );
            std::thread::yield_now();
        }
    }

    /// A connection is served where it was accepted unless another worker has fewer sessions
    /// (the accept loop not counted), then moved there; each session runs on its worker's own
    /// thread; and what is still on a worker is dropped when the workers are.
    #[test]
    fn sessions_go_to_the_worker_with_the_fewest() {
        let workers = Workers::start(2, false).expect("workers");
        let (names_tx, names) = mpsc::channel();
        let (dropped_tx, dropped) = mpsc::channel();
        // Listener 0's accept loop, standing in: a task on worker 0 that is not a session.
        let (_stop_loop, loop_stop) = oneshot::channel::<()>();
        let (on, mark) = workers.host_loop(0);
        on.spawn(async move {
            let _mark = mark;
            let _ = loop_stop.await;
        });
        // A session accepted by listener 0's loop: says which thread it runs on, then waits
        // until told to end. Returns whether it was moved, and its end.
        let accept = |workers: &Workers| {
            let (end, ended) = oneshot::channel::<()>();
            let names_tx = names_tx.clone();
            let guard = Dropped(dropped_tx.clone());
            let session = async move {
                let _guard = guard;
                let name = std::thread::current().name().map(str::to_owned);
                let _ = names_tx.send(name.unwrap_or_default());
                let _ = ended.await;
            };
            let moved = match workers.place(0) {
                Placed::Here => {
                    workers.workers[0].handle.spawn(session);
                    false
                }
                Placed::Away(on) => {
                    on.spawn(session);
                    true
                }
            };
            (moved, end)
        };
        let thread = || names.recv_timeout(Duration::from_secs(10)).expect("ran");
        // Ties stay where accepted: here, away, here, away.
        let (moved, mut ends): (Vec<bool>, Vec<_>) = (0..4).map(|_| accept(&workers)).unzip();
        assert_eq!(moved, [false, true, false, true]);
        assert_eq!(
            workers.loads(),
            [3, 2],
            "the loop and two sessions, two sessions"
        );
        let mut on: Vec<String> = (0..4).map(|_| thread()).collect();
        on.sort();
        assert_eq!(
            on,
            ["wasmbed-w-0", "wasmbed-w-0", "wasmbed-w-1", "wasmbed-w-1"]
        );
        // The two on worker 1 end: the next two both move there.
        drop(ends.remove(3));
        drop(ends.remove(1));
        loads_become(&workers, &[3, 0]);
        for _ in 0..2 {
            let (moved, end) = accept(&workers);
            assert!(moved, "not moved to the worker with the fewest");
            ends.push(end);
            assert_eq!(thread(), "wasmbed-w-1");
        }
        assert_eq!(workers.loads(), [3, 2]);
        // Dropping the workers drops the four sessions still there.
        assert_eq!(dropped.try_iter().count(), 2, "two sessions ended");
        drop(workers);
        for _ in 0..4 {
            dropped
                .recv_timeout(Duration::from_secs(10))
                .expect("a session left on a stopped worker");
        }
        drop(ends);
    }
}
