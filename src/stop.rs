//! How a long-running process (proxy, gateway) stops, whatever else is going wrong.
//!
//! - The first SIGTERM or SIGINT cancels the shutdown token: the orderly stop (grace, GOAWAY,
//!   sessions finishing) is the library's.
//! - A second signal ends the process at once.
//! - `hard_stop_after` past the first signal, the process ends whatever still runs (HAProxy's
//!   `hard-stop-after`), with a line naming what was still running.
//!
//! Neither deadline depends on the runtime: both run on a plain thread, so a wedged task or a
//! blocked log cannot hold them. And nothing on this path may fail on output: the log goes
//! through [`logging`], which never blocks and never panics when stderr is a closed or full
//! pipe (a log shipper restarting, `| head`). Before, tracing-subscriber's own report of a failed
//! write (`eprintln!`) panicked in whichever task logged, the signal task included, and the
//! process no longer heard SIGTERM.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// What the process still runs, for the line a forced stop prints.
pub type Running = Arc<dyn Fn() -> String + Send + Sync>;

/// Registers SIGTERM and SIGINT at once (call it before announcing readiness: from then on
/// they no longer kill the process) and returns what waits for them. The deadlines start
/// with the stop, whatever began it (a signal, or `shutdown` cancelled by `POST
/// /api/shutdown`); any signal after that is the second.
/// `hard_stop_after` is read when the stop begins: a reload may have changed it (the proxy's
/// default follows `grace`, which a reload changes).
pub fn on_signal(
    shutdown: CancellationToken,
    hard_stop_after: impl Fn() -> Duration + Send + 'static,
    running: Running,
) -> impl Future<Output = ()> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    let watch = |kind: SignalKind, name: &str| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch {name}");
            None
        }
    };
    let mut term = watch(SignalKind::terminate(), "SIGTERM");
    let mut int = watch(SignalKind::interrupt(), "SIGINT");
    async fn next(s: &mut Option<Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    async move {
        let first = tokio::select! {
            _ = next(&mut term) => "SIGTERM",
            _ = next(&mut int) => "SIGINT",
            _ = shutdown.cancelled() => "a stop request",
        };
        // Cancel before anything that could fail or wait.
        shutdown.cancel();
        let hard_stop_after = hard_stop_after();
        tracing::info!(
            hard_stop_after = ?hard_stop_after,
            "{first}: shutting down (a second signal stops at once)"
        );
        let watchdog = running.clone();
        let spawned = std::thread::Builder::new()
            .name("hard-stop".into())
            .spawn(move || {
                std::thread::sleep(hard_stop_after);
                exit_now(
                    &format!("hard stop: {hard_stop_after:?} after {first}"),
                    &watchdog,
                );
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no hard-stop deadline: cannot start its thread");
        }
        let second = tokio::select! {
            _ = next(&mut term) => "SIGTERM",
            _ = next(&mut int) => "SIGINT",
        };
        exit_now(&format!("second signal ({second})"), &running);
    }
}

/// Ends the process now with status 1, after one line on stderr naming what still ran. The
/// line is written from its own thread and given a second: a stderr nobody reads must not
/// keep the process alive.
fn exit_now(why: &str, running: &Running) -> ! {
    let line = format!(
        "wasmbed: {why}: stopping now; still running: {}\n",
        running()
    );
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("last-words".into())
        .spawn(move || {
            let _ = std::io::stderr().write_all(line.as_bytes());
            let _ = done_tx.send(());
        });
    let _ = done_rx.recv_timeout(Duration::from_secs(1));
    std::process::exit(1)
}

/// Logging that never blocks the process and never fails it: lines go to stderr through a
/// bounded queue and a writer thread (tracing-appender, lossy: when stderr is full, lines are
/// dropped rather than waited for), and a write error (a closed pipe) drops the line.
pub mod logging {
    use std::io::Write;

    /// stderr whose errors are swallowed: a log line that cannot be written is lost, nothing
    /// else.
    struct Quiet;

    impl Write for Quiet {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = std::io::stderr().write_all(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            let _ = std::io::stderr().flush();
            Ok(())
        }
    }

    /// Flushes what is queued, bounded: the guard's drop waits for the writer thread, and
    /// tracing-appender prints (`println!`) when it cannot hand it the last message — a
    /// full stderr and a closed stdout must not hold or crash the exit. One second, then the
    /// process goes on without it.
    pub fn finish(guard: tracing_appender::non_blocking::WorkerGuard) {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                drop(guard);
                let _ = done_tx.send(());
            });
        if spawned.is_ok() {
            let _ = done_rx.recv_timeout(std::time::Duration::from_secs(1));
        }
    }

    /// Installs the global subscriber; hand the guard to [`finish`] at the end of `main`.
    pub fn init(format: wasmbed_config::LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
        // quinn logs a warning per odd datagram a peer sends (a stale retry token, a reset
        // token seen twice): under a flood that is a log line per packet, so only its errors
        // by default.
        let filter = tracing_subscriber::EnvFilter::try_from_env("WASMBED_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn_proto=error"));
        // Colour only for a terminal: a log file or a pipe gets plain text.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .thread_name("log-writer")
            .finish(Quiet);
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .log_internal_errors(false)
            .with_writer(writer);
        match format {
            wasmbed_config::LogFormat::Json => builder.json().init(),
            wasmbed_config::LogFormat::Pretty => builder.init(),
        }
        guard
    }
}
