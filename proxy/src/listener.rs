//! accept: bind the device-facing sockets and accept connections, backing off (never spinning,
//! never exiting) when accept fails, e.g. when the process is out of file descriptors.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use wasmbed_config::ListenerConfig;

use crate::metric_names::ACCEPT_ERRORS;

/// Binds one listener: `SO_REUSEADDR`, optional `SO_REUSEPORT`, `TCP_NODELAY` and keepalive
/// (both inherited by accepted sockets on Linux), non-blocking.
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
    TcpListener::from_std(socket.into())
}

/// An accepted device connection and its place under `--max-connections`.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub permit: OwnedSemaphorePermit,
}

/// Accepts until `shutdown`, handing each connection to `handle`. Waits for a free slot under
/// `limit` before accepting, so past `--max-connections` devices wait in the backlog.
pub async fn accept_loop(
    listener: TcpListener,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
    mut handle: impl FnMut(Accepted),
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(10);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // the semaphore is closed: shutting down
            },
            _ = shutdown.cancelled() => return,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => return,
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
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
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
