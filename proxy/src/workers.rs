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
//! Sessions are not moved between workers once placed; a new one goes to the worker with the
//! fewest live tasks (a session is one task, a terminated one a second for a moment), ties in
//! turn. QUIC devices stay on the main runtime: quinn's endpoint is one task that every one of
//! its connections' datagrams passes through.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

use crate::control::runtime_thread;

/// How many threads serve sessions: `threads`, or every core this process may run on.
pub fn threads(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// One-thread runtimes serving sessions; their threads end when this is dropped (a task still
/// on one is dropped with it).
pub(crate) struct Workers {
    handles: Vec<Handle>,
    /// Where the search for the least loaded starts: ties go round in turn.
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Workers {
    /// `n` workers (`wasmbed-worker-0`, ...), with a time driver when `timers` (the data
    /// plane's, `deadlines::data_plane_timers`).
    pub(crate) fn start(n: usize, timers: bool) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let enable: fn(&mut Builder) -> &mut Builder = if timers {
            Builder::enable_all
        } else {
            Builder::enable_io
        };
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let until = stop.clone();
            // A failed start stops the threads already started (`stop`'s drop below).
            let started =
                runtime_thread(&format!("wasmbed-worker-{i}"), enable, move || async move {
                    until.cancelled().await
                });
            match started {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop.cancel();
                    return Err(e);
                }
            }
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
            stop,
        })
    }

    /// The worker a new session goes to: the one with the fewest live tasks.
    pub(crate) fn place(&self) -> &Handle {
        let n = self.handles.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = start;
        let mut least = usize::MAX;
        for k in 0..n {
            let i = (start + k) % n;
            let load = self.handles[i].metrics().num_alive_tasks();
            if load < least {
                least = load;
                best = i;
            }
        }
        &self.handles[best]
    }

    /// Live tasks on each worker, in order.
    #[cfg(test)]
    pub(crate) fn loads(&self) -> Vec<usize> {
        self.handles
            .iter()
            .map(|h| h.metrics().num_alive_tasks())
            .collect()
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

    /// Sessions go to the least loaded worker (ties in turn), each runs on its worker's own
    /// thread, and what is still on a worker is dropped when the workers are.
    #[test]
    fn sessions_go_to_the_least_loaded_worker() {
        let workers = Workers::start(2, false).expect("workers");
        let (names_tx, names) = mpsc::channel();
        let (dropped_tx, dropped) = mpsc::channel();
        // A session: says which thread it runs on, then waits until told to end.
        let spawn = |workers: &Workers| {
            let (end, ended) = oneshot::channel::<()>();
            let names_tx = names_tx.clone();
            let guard = Dropped(dropped_tx.clone());
            workers.place().spawn(async move {
                let _guard = guard;
                let name = std::thread::current().name().map(str::to_owned);
                let _ = names_tx.send(name.unwrap_or_default());
                let _ = ended.await;
            });
            end
        };
        let thread = || names.recv_timeout(Duration::from_secs(10)).expect("ran");
        // Even: in turn, 0, 1, 0, 1.
        let mut ends: Vec<_> = (0..4).map(|_| spawn(&workers)).collect();
        assert_eq!(workers.loads(), [2, 2]);
        let mut on: Vec<String> = (0..4).map(|_| thread()).collect();
        on.sort();
        assert_eq!(
            on,
            [
                "wasmbed-worker-0",
                "wasmbed-worker-0",
                "wasmbed-worker-1",
                "wasmbed-worker-1"
            ]
        );
        // The two on worker 1 end: the next two both go there (in turn would give one each).
        drop(ends.remove(3));
        drop(ends.remove(1));
        loads_become(&workers, &[2, 0]);
        ends.push(spawn(&workers));
        ends.push(spawn(&workers));
        assert_eq!(workers.loads(), [2, 2], "not to the least loaded");
        for _ in 0..2 {
            assert_eq!(thread(), "wasmbed-worker-1");
        }
        // Dropping the workers drops the four sessions still there.
        let before = dropped.try_iter().count();
        assert_eq!(before, 2, "two sessions ended");
        drop(workers);
        for _ in 0..4 {
            dropped
                .recv_timeout(Duration::from_secs(10))
                .expect("a session left on a stopped worker");
        }
        drop(ends);
    }
}
