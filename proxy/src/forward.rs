//! forward: bytes both ways between a device and its gateway, until either side closes.
//!
//! For plain TCP pairs (passthrough) each direction waits for readiness holding no buffer,
//! then reads into a per-thread buffer and writes straight on; only when the other side's
//! socket is full does a direction keep the unsent bytes, and it frees them once sent. An
//! idle session therefore holds no copy buffer at all: its cost is the task and two sockets.
//!
//! Fairness: `poll_read_ready` and `poll_write_ready` take from tokio's cooperative budget, so
//! a busy direction yields to other tasks like any tokio I/O.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

const CHUNK: usize = 64 * 1024;

thread_local! {
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
}

/// Bytes forwarded by a finished session.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    /// device -> gateway
    pub upstream: u64,
    /// gateway -> device
    pub downstream: u64,
}

/// Forwards between two TCP streams until both directions have ended (half-closes are
/// passed on) or either side fails. `up` and `down` count the bytes as they go.
///
/// Hand-written rather than two `async` loops: it waits through `poll_read_ready`, whose waker
/// lives in the socket's own registration, so an idle session's whole forwarding state is
/// about a hundred bytes (two `async` pumps with their readiness futures take ~750).
pub fn tcp<'a>(
    device: &'a TcpStream,
    gateway: &'a TcpStream,
    up: &'a AtomicU64,
    down: &'a AtomicU64,
) -> Tcp<'a> {
    Tcp {
        directions: [
            Direction::new(device, gateway, up),
            Direction::new(gateway, device, down),
        ],
    }
}

/// The future [`tcp`] returns.
pub struct Tcp<'a> {
    directions: [Direction<'a>; 2],
}

impl Future for Tcp<'_> {
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut finished = true;
        for direction in self.directions.iter_mut() {
            match direction.poll(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => finished = false,
            }
        }
        if finished {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

/// One direction: read from `src`, write to `dst`; on end of stream, shut `dst`'s write half.
struct Direction<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    total: &'a AtomicU64,
    /// Bytes read but not yet taken by `dst` (empty, and unallocated, while `dst` keeps up).
    backlog: Vec<u8>,
    sent: usize,
    done: bool,
}

impl<'a> Direction<'a> {
    fn new(src: &'a TcpStream, dst: &'a TcpStream, total: &'a AtomicU64) -> Self {
        Direction {
            src,
            dst,
            total,
            backlog: Vec::new(),
            sent: 0,
            done: false,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.done {
            ready!(self.flush(cx))?;
            ready!(self.src.poll_read_ready(cx))?;
            let (src, dst) = (self.src, self.dst);
            let read = BUFFER.with(|cell| {
                let mut buf = cell.borrow_mut();
                let n = src.try_read(&mut buf)?;
                if n > 0 {
                    let written = write_now(dst, &buf[..n])?;
                    if written < n {
                        self.backlog = buf[written..n].to_vec();
                        self.sent = 0;
                    }
                }
                io::Result::Ok(n)
            });
            match read {
                Ok(0) => {
                    // The peer may already be gone; its own direction reports that.
                    let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
                    self.done = true;
                }
                Ok(n) => {
                    self.total.fetch_add(n as u64, Ordering::Relaxed);
                }
                // Readiness was stale: `try_read` cleared it, and the next poll re-arms it.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the backlog, if any, then frees it.
    fn flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.backlog.len() {
            ready!(self.dst.poll_write_ready(cx))?;
            match self.dst.try_write(&self.backlog[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if !self.backlog.is_empty() {
            self.backlog = Vec::new();
            self.sent = 0;
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes as much of `bytes` as the socket takes now.
fn write_now(dst: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match dst.try_write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// Writes all of `bytes`, waiting for room.
pub async fn write_all(dst: &TcpStream, bytes: &[u8]) -> io::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        dst.writable().await?;
        written += write_now(dst, &bytes[written..])?;
    }
    Ok(())
}

/// Forwards between any two async streams (TLS on one or both sides), with buffers.
pub async fn streams<A, B>(device: &mut A, gateway: &mut B) -> io::Result<Forwarded>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (upstream, downstream) =
        tokio::io::copy_bidirectional_with_sizes(device, gateway, 16 * 1024, 16 * 1024).await?;
    Ok(Forwarded {
        upstream,
        downstream,
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn forwards_large_transfers_both_ways_and_passes_half_close() {
        let (mut device, device_side) = pair().await;
        let (gateway_side, mut gateway) = pair().await;
        let relay = tokio::spawn(async move {
            let (u, d) = (AtomicU64::new(0), AtomicU64::new(0));
            tcp(&device_side, &gateway_side, &u, &d)
                .await
                .map(|()| (u.into_inner(), d.into_inner()))
        });
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let device_task = tokio::spawn(async move {
            device.write_all(&up2).await.unwrap();
            device.shutdown().await.unwrap(); // half-close: still reads the answer
            let mut got = Vec::new();
            device.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got = Vec::new();
        gateway.read_to_end(&mut got).await.unwrap(); // ends when the device half-closes
        assert!(got == up, "upstream bytes intact");
        gateway.write_all(&down2).await.unwrap();
        drop(gateway);
        assert!(
            device_task.await.unwrap() == down,
            "downstream bytes intact"
        );
        assert_eq!(relay.await.unwrap().unwrap(), (3_000_000, 2_000_000));
    }

    #[tokio::test]
    async fn a_reset_ends_the_session_with_an_error() {
        let (mut device, device_side) = pair().await;
        let (gateway_side, gateway) = pair().await;
        let relay = tokio::spawn(async move {
            let (u, d) = (AtomicU64::new(0), AtomicU64::new(0));
            tcp(&device_side, &gateway_side, &u, &d).await
        });
        socket2::SockRef::from(&gateway)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(gateway); // RST
        let r = relay.await.unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        let mut rest = Vec::new();
        assert_eq!(
            device.read_to_end(&mut rest).await.unwrap(),
            0,
            "device sees the close"
        );
    }
}
