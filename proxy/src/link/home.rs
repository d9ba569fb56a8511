//! A lane's runtime ([`Home`]), given to quinn as its runtime.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use crate::events::Counted;

/// A lane's runtime, and quinn's runtime for its endpoint: quinn's tokio runtime, but every
/// task made for the lane (the endpoint's driver, each connection's, each liveness watch) is
/// spawned on the lane's runtime and, on a worker, not counted among its sessions (a worker's
/// load is its sessions: `workers`).
#[derive(Debug)]
pub(super) struct Home {
    pub(super) handle: tokio::runtime::Handle,
    /// On a worker: its count of tasks that are not sessions.
    pub(super) others: Option<Arc<AtomicUsize>>,
}

impl Home {
    pub(super) fn spawn_task(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mark = self.others.as_ref().map(Counted::new);
        self.handle.spawn(async move {
            let _mark = mark;
            task.await;
        });
    }
}

impl quinn::Runtime for Home {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        // quinn makes timers in its connection driver, on the lane's runtime already.
        let _home = self.handle.enter();
        quinn::TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.spawn_task(future);
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        // Registered with the lane's runtime.
        let _home = self.handle.enter();
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }

    fn now(&self) -> Instant {
        quinn::TokioRuntime.now()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;

    /// A lane made off its runtime's thread (`Links::new` makes the workers' lanes from the
    /// main runtime's; here from a thread with no runtime at all): its socket is registered
    /// with its runtime, its endpoint's driver is spawned there, marked as not a session, and
    /// the mark goes with the driver.
    #[test]
    fn a_lanes_endpoint_runs_on_its_runtime_marked_as_not_a_session() {
        let stop = CancellationToken::new();
        let until = stop.clone();
        let handle = crate::control::runtime_thread(
            "wasmbed-lane-t",
            tokio::runtime::Builder::enable_all,
            move || async move { until.cancelled().await },
        )
        .expect("a runtime thread");
        let others = Arc::new(AtomicUsize::new(0));
        let home = Home {
            handle: handle.clone(),
            others: Some(others.clone()),
        };
        let lane = super::super::Lane::on(home).expect("a lane, made with no runtime here");
        assert_eq!(others.load(Ordering::Relaxed), 1, "the endpoint's driver");
        assert_eq!(
            handle.metrics().num_alive_tasks(),
            1,
            "on the lane's runtime"
        );
        assert!(lane.endpoint.local_addr().is_ok());
        drop(lane);
        // The driver ends once its endpoint is gone and idle: nothing signals it (bounded).
        let since = std::time::Instant::now();
        while others.load(Ordering::Relaxed) != 0 {
            assert!(
                since.elapsed() < Duration::from_secs(10),
                "the mark outlived its task"
            );
            std::thread::yield_now();
        }
        stop.cancel();
    }
}
