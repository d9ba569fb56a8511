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

use std::future::Future;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio_util::sync::CancellationToken;

/// A thread named `name` running a one-thread runtime (its drivers chosen by `enable`) until
/// `main`'s future ends; returns the runtime's handle. The runtime is built here and handed to
/// the thread once it runs, and dropped there at its end. If the thread cannot start, it is
/// shut down without waiting: a runtime dropped the usual way inside another (this is called
/// from async code) is a panic in tokio.
pub(crate) fn runtime_thread<M, F>(
    name: &str,
    enable: fn(&mut Builder) -> &mut Builder,
    main: M,
) -> std::io::Result<Handle>
where
    M: FnOnce() -> F + Send + 'static,
    F: Future<Output = ()>,
{
    let runtime = enable(&mut Builder::new_current_thread()).build()?;
    let handle = runtime.handle().clone();
    let (give, take) = std::sync::mpsc::sync_channel::<Runtime>(1);
    let started = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Ok(runtime) = take.recv() {
                runtime.block_on(main());
            }
        });
    let refused = match started {
        Ok(_) => match give.send(runtime) {
            Ok(()) => return Ok(handle),
            Err(std::sync::mpsc::SendError(runtime)) => (
                runtime,
                std::io::Error::other(format!("thread {name} ended at its start")),
            ),
        },
        Err(e) => (runtime, e),
    };
    refused.0.shutdown_background();
    Err(refused.1)
}

/// The control runtime; its thread ends when this is dropped.
pub(crate) struct Control {
    handle: Handle,
    stop: CancellationToken,
}

impl Control {
    /// `name`: the thread's (`wasmbed-probes`, `wasmbed-admin`).
    pub(crate) fn start(name: &str) -> std::io::Result<Control> {
        let stop = CancellationToken::new();
        let until = stop.clone();
        let handle = runtime_thread(name, Builder::enable_all, move || async move {
            until.cancelled().await
        })?;
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
