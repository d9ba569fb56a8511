//! The control plane's own threads: the health probes with the liveness watch, and the admin
//! endpoint, each run on a runtime of their own (one thread each), beside the data plane's
//! workers.
//!
//! Why: in a reconnect storm the data plane's workers have thousands of handshakes queued; a
//! probe task queued behind them misses its timeout, and a busy proxy calls a healthy gateway
//! down (seen at 9,000 devices) — a busy gateway is slow, not down. And an operator must be
//! able to reach `/metrics` or drain a gateway while the data plane is saturated. A thread of
//! its own gets the kernel's fair share of a core whatever the workers' queues hold (the way
//! Envoy keeps its admin and health checking off its worker threads). The admin endpoint has
//! a thread apart from the probes': whoever reaches the admin port (slow clients, TLS
//! handshakes, a `/metrics` scrape) cannot delay a probe either.

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The control runtime; its thread ends when this is dropped.
pub(crate) struct Control {
    handle: Handle,
    stop: CancellationToken,
}

impl Control {
    /// `name`: the thread's (`wasmbed-probes`, `wasmbed-admin`).
    pub(crate) fn start(name: &str) -> std::io::Result<Control> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let stop = CancellationToken::new();
        let until = stop.clone();
        std::thread::Builder::new()
            .name(name.into())
            // The runtime is dropped on this thread once stopped: what still runs on it ends.
            .spawn(move || runtime.block_on(until.cancelled()))?;
        Ok(Control { handle, stop })
    }

    /// Where control tasks are spawned (`TaskTracker::spawn_on`).
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
