//! The control plane's own thread: the health probes, the liveness watch and the admin
//! endpoint run on a runtime of their own (one thread), beside the data plane's workers.
//!
//! Why: in a reconnect storm the data plane's workers have thousands of handshakes queued; a
//! probe task queued behind them misses its timeout, and a busy proxy calls a healthy gateway
//! down (seen at 9,000 devices) — a busy gateway is slow, not down. And an operator must be
//! able to reach `/metrics` or drain a gateway while the data plane is saturated. A thread of
//! its own gets the kernel's fair share of a core whatever the workers' queues hold (the way
//! Envoy keeps its admin and health checking off its worker threads).

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The control runtime; its thread ends when this is dropped.
pub(crate) struct Control {
    handle: Handle,
    stop: CancellationToken,
}

impl Control {
    pub(crate) fn start() -> std::io::Result<Control> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let stop = CancellationToken::new();
        let until = stop.clone();
        std::thread::Builder::new()
            .name("wasmbed-control".into())
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
