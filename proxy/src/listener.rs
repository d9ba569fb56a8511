//! accept: bind the device-facing sockets and accept connections, backing off (never spinning,
//! never exiting) when accept fails, e.g. when the process is out of file descriptors.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use wasmbed_certs::Trigger;
use wasmbed_config::ListenerConfig;

use crate::deadlines::Deadlines;
use crate::metric_names::ACCEPT_ERRORS;

/// Binds one listener: `SO_REUSEADDR`, optional `SO_REUSEPORT`, `TCP_NODELAY` and keepalive
/// (both inherited by accepted sockets on Linux), non-blocking, `TCP_DEFER_ACCEPT` (`defer_accept`;
/// zero: none).
pub fn bind(config: &ListenerConfig) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(config.addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if config.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10))
            .with_retries(6),
    )?;
    socket.set_nonblocking(true)?;
    socket.bind(&config.addr.into())?;
    socket.listen(i32::try_from(config.backlog).unwrap_or(i32::MAX))?;
    crate::sockopt::defer_accept(&socket, config.defer_accept)?;
    TcpListener::from_std(socket.into())
}

/// Takes on a listener the running proxy handed over (`--takeover`): bound and configured by
/// the old process. `defer_accept` is set again here, so that an upgrade applies the new
/// config's value as a start does; the rest (address, `reuse_port`, backlog) is the old
/// process's, as a takeover keeps the listening socket itself.
pub fn adopt(socket: std::net::TcpListener, config: &ListenerConfig) -> io::Result<TcpListener> {
    crate::sockopt::defer_accept(&socket, config.defer_accept)?;
    TcpListener::from_std(socket)
}

/// An accepted device connection and its place under `--max-connections`.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub permit: OwnedSemaphorePermit,
}

impl Accepted {
    /// Moved to the runtime `on` (a session worker other than the one that accepted it), to be
    /// served there: taken out of this runtime's driver and registered with `on`'s, so that its
    /// readiness is delivered on the thread its session runs on. Registered before the session
    /// is spawned there: the kernel reports a registered socket's state at that runtime's next
    /// wait, so when that worker is waiting (as an idle one is) the device's first bytes (there
    /// at accept: `TCP_DEFER_ACCEPT`) are known to be there when the session first reads; a
    /// busy worker may poll the session first, and its first read waits a turn. Failing (the
    /// kernel refused the descriptor a place in that runtime's epoll set: out of memory, or
    /// past `max_user_watches`), the connection is closed and counted as an accept error
    /// (`kind="register"`).
    pub fn moved_to(self, on: &tokio::runtime::Handle) -> Option<Accepted> {
        let Accepted {
            stream,
            peer,
            permit,
        } = self;
        let moved = stream.into_std().and_then(|s| {
            let _on = on.enter();
            TcpStream::from_std(s)
        });
        match moved {
            Ok(stream) => Some(Accepted {
                stream,
                peer,
                permit,
            }),
            Err(e) => {
                counter!(ACCEPT_ERRORS, "kind" => "register").increment(1);
                tracing::warn!(error = %e, %peer, "an accepted connection could not be moved to its worker: closed");
                None
            }
        }
    }
}

/// Accepts until `stop` fires, handing each connection to `handle`. Waits for a free slot
/// under `limit` before accepting, so past `--max-connections` devices wait in the backlog.
///
/// Per connection it takes its slot without a future while slots are free, and the stop is
/// one wait for the loop's life, a flag read at each poll (`wasmbed_certs::Fired`): a wait
/// made anew per connection (a `CancellationToken`'s) took a lock to register and one to
/// unregister, and the slot's future its own polls (measured: docs/performance.md, "The
/// accept loop's waits and the sessions' series").
///
/// `listener` is registered with the runtime the loop runs on (a session worker's, `workers`),
/// and so are the connections it accepts.
pub async fn accept_loop(
    listener: TcpListener,
    limit: Arc<Semaphore>,
    deadlines: Deadlines,
    stop: Trigger,
    mut handle: impl FnMut(Accepted),
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(10);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut backoff = FIRST_BACKOFF;
    let mut stopped = stop.fired();
    loop {
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return, // no slot will come
            Err(TryAcquireError::NoPermits) => tokio::select! {
                biased;
                _ = &mut stopped => return,
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            },
        };
        // `biased`, the stop first: a stop wins a tie with a waiting connection.
        // `poll_accept`, not `accept()`: the latter's future, made anew per connection, joins
        // the socket's list of waiters and leaves it under the lock again at its drop;
        // `poll_accept` keeps the loop's one waker in the socket's reader slot (still stored
        // under that lock when nothing is waiting in the backlog).
        let accepted = tokio::select! {
            biased;
            _ = &mut stopped => return,
            r = std::future::poll_fn(|cx| listener.poll_accept(cx)) => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = FIRST_BACKOFF;
                handle(Accepted {
                    stream,
                    peer,
                    permit,
                });
            }
            // The connection died in the backlog: nothing is wrong with the listener.
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                let kind = if e.raw_os_error() == Some(libc::EMFILE)
                    || e.raw_os_error() == Some(libc::ENFILE)
                {
                    "emfile"
                } else {
                    "other"
                };
                counter!(ACCEPT_ERRORS, "kind" => kind).increment(1);
                tracing::warn!(error = %e, retry_in = ?backoff, "accept failed; backing off");
                // On the timer thread: the data plane may have no time driver.
                if deadlines.timeout(backoff, &mut stopped).await.is_ok() {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Makes closing `stream` send a reset rather than a FIN, so the device learns at once that
/// this session is over and reconnects.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::net::TcpStream;
    use tokio::sync::Semaphore;
    use wasmbed_certs::Trigger;

    /// A listener on a free loopback port, and its address.
    async fn listening() -> (tokio::net::TcpListener, std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local address");
        (listener, addr)
    }

    /// Waits until the loop's stop has a registered wait: the loop is parked in a wait that
    /// polls it (for a slot, or for a connection). Bounded: a loop whose wait does not watch
    /// its stop fails the test rather than hanging it.
    async fn parked(stop: &wasmbed_certs::Trigger) {
        let registered = async {
            while stop.waiting() == 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), registered)
            .await
            .expect("the accept loop's wait does not watch its stop");
    }

    /// The accept loop on `listener`, spawned.
    fn spawned(
        listener: tokio::net::TcpListener,
        limit: Arc<Semaphore>,
        stop: &Trigger,
        handle: impl FnMut(super::Accepted) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(super::accept_loop(
            listener,
            limit,
            crate::deadlines::Deadlines::default(),
            stop.clone(),
            handle,
        ))
    }

    /// Fires `stop` once the loop `run` waits on it, and checks the loop ends.
    async fn stop_when_parked(stop: &Trigger, run: tokio::task::JoinHandle<()>) {
        parked(stop).await;
        stop.fire();
        ended(run).await;
    }

    /// `run` ended (within a bound, for a test that fails rather than hangs).
    async fn ended(run: tokio::task::JoinHandle<()>) {
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the accept loop did not end at its stop")
            .expect("the accept loop panicked");
    }

    /// While slots are free the loop hands connections on, each with its slot; with none
    /// free it waits without accepting; a slot given back lets the next connection through;
    /// the stop ends the loop while it waits for a slot.
    #[tokio::test]
    async fn the_accept_loop_takes_free_slots_and_ends_at_its_stop_waiting_for_one() {
        let (listener, addr) = listening().await;
        let limit = Arc::new(Semaphore::new(2));
        let stop = Trigger::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let run = spawned(listener, limit.clone(), &stop, move |a| {
            let _ = tx.send(a);
        });
        let _one = TcpStream::connect(addr).await.expect("connect");
        let _two = TcpStream::connect(addr).await.expect("connect");
        let first = rx.recv().await.expect("first connection handed on");
        let _second = rx.recv().await.expect("second connection handed on");
        assert_eq!(limit.available_permits(), 0);
        let _three = TcpStream::connect(addr).await.expect("connect");
        // An absence, which nothing signals: in 200 ms, in which the runtime parks and polls
        // its sockets, a loop that accepted without a slot would have handed it on.
        let early = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
        assert!(early.is_err(), "handed on without a free slot");
        drop(first);
        let _third = rx
            .recv()
            .await
            .expect("third connection, once a slot was free");
        stop_when_parked(&stop, run).await;
    }

    /// The stop ends the loop while it waits for a connection.
    #[tokio::test]
    async fn the_accept_loop_ends_at_its_stop_waiting_for_a_connection() {
        let (listener, _) = listening().await;
        let stop = Trigger::new();
        let run = spawned(listener, Arc::new(Semaphore::new(4)), &stop, |_| {});
        stop_when_parked(&stop, run).await;
    }

    /// A stop that comes with a connection waiting in the backlog wins: nothing is handed on
    /// after it.
    #[tokio::test]
    async fn the_accept_loop_hands_nothing_on_after_its_stop() {
        let (listener, addr) = listening().await;
        let _waiting = TcpStream::connect(addr).await.expect("connect");
        let stop = Trigger::new();
        stop.fire();
        let handed = Arc::new(AtomicUsize::new(0));
        let counted = handed.clone();
        let run = spawned(listener, Arc::new(Semaphore::new(4)), &stop, move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        ended(run).await;
        assert_eq!(
            handed.load(Ordering::Relaxed),
            0,
            "handed on after the stop"
        );
    }

    /// A connection moved to another runtime is served by that runtime's driver alone: with
    /// the runtime that accepted it blocked, the moved connection still answers. (Registered
    /// with the accepting runtime instead, its readiness would wait for that runtime's driver,
    /// and the session, on a one-thread runtime, would be polled as if its socket were its
    /// own: `forward::Tcp`'s idle-direction skip.)
    #[test]
    fn a_moved_connection_is_served_by_the_runtime_it_moved_to() {
        use std::io::{Read, Write};
        use std::sync::mpsc;
        use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
        let (stop_a, stopping_a) = tokio::sync::oneshot::channel::<()>();
        let (stop_b, stopping_b) = tokio::sync::oneshot::channel::<()>();
        let start = |name: &str, until: tokio::sync::oneshot::Receiver<()>| {
            crate::control::runtime_thread(
                name,
                tokio::runtime::Builder::enable_io,
                move || async move {
                    let _ = until.await;
                },
            )
            .expect("a runtime thread")
        };
        let (a, b) = (start("accepting", stopping_a), start("serving", stopping_b));
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("non-blocking");
        let addr = std_listener.local_addr().expect("address");
        let listener = {
            let _a = a.enter();
            tokio::net::TcpListener::from_std(std_listener).expect("registered with A")
        };
        let mut device = std::net::TcpStream::connect(addr).expect("connect");
        device
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let (accepted_tx, accepted) = mpsc::channel();
        a.spawn(async move {
            let _ = accepted_tx.send(listener.accept().await);
        });
        let (stream, peer) = accepted
            .recv_timeout(Duration::from_secs(10))
            .expect("accepted")
            .expect("accept");
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("a slot");
        let moved = super::Accepted {
            stream,
            peer,
            permit,
        }
        .moved_to(&b)
        .expect("moved");
        // A blocked: its driver reports nothing from now on.
        let (unblock, blocked) = mpsc::channel::<()>();
        let (parked_tx, parked) = mpsc::channel();
        a.spawn(async move {
            let _ = parked_tx.send(());
            let _ = blocked.recv();
        });
        parked
            .recv_timeout(Duration::from_secs(10))
            .expect("A blocked");
        let (waiting_tx, waiting) = mpsc::channel();
        b.spawn(async move {
            let mut s = moved.stream;
            let mut buf = [0u8; 4];
            // A first read before the device sends: it finds nothing, so what wakes the
            // session for the bytes is the readiness a driver reports, not a read that tries.
            let found_nothing = std::future::poll_fn(|cx| {
                let mut none = tokio::io::ReadBuf::new(&mut buf);
                let read = std::pin::Pin::new(&mut s).poll_read(cx, &mut none);
                std::task::Poll::Ready(read.is_pending())
            })
            .await;
            let _ = waiting_tx.send(found_nothing);
            if s.read_exact(&mut buf).await.is_ok() {
                let _ = s.write_all(&buf).await;
            }
        });
        let found_nothing = waiting.recv_timeout(Duration::from_secs(10));
        assert_eq!(found_nothing, Ok(true), "the first read found bytes");
        device.write_all(b"ping").expect("send");
        let mut echo = [0u8; 4];
        let answered = device.read_exact(&mut echo);
        let _ = unblock.send(());
        let (_, _) = (stop_a.send(()), stop_b.send(()));
        answered.expect("no answer: the moved connection waits on the blocked runtime");
        assert_eq!(&echo, b"ping");
    }
}
