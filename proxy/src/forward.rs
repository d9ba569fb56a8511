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
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

const CHUNK: usize = 64 * 1024;

thread_local! {
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
}

/// Where a direction counts its bytes as they go: a plain atomic (tests), or a metrics
/// counter (the proxy's `wasmbed_proxy_bytes_total`, live while sessions last: one atomic add
/// per chunk read).
pub trait Count: Sync {
    fn add(&self, n: u64);
}

impl Count for AtomicU64 {
    fn add(&self, n: u64) {
        self.fetch_add(n, Ordering::Relaxed);
    }
}

impl Count for metrics::Counter {
    fn add(&self, n: u64) {
        self.increment(n);
    }
}

type Total = dyn Count;

/// Bytes forwarded by a finished session.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    /// device -> gateway
    pub upstream: u64,
    /// gateway -> device
    pub downstream: u64,
}

/// Why forwarding stopped with an error, and on which side: the proxy treats errors on the
/// gateway's side as a hint that the gateway is failing (it probes it at once).
#[derive(Debug)]
pub struct Failure {
    /// The error was on the gateway's socket (reading from it or writing to it).
    pub gateway: bool,
    pub error: io::Error,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = if self.gateway { "gateway" } else { "device" };
        write!(f, "{side} side: {}", self.error)
    }
}

impl Failure {
    pub fn device(error: io::Error) -> Failure {
        Failure {
            gateway: false,
            error,
        }
    }

    /// Whether the gateway's side failed the way a dead or failing host does (a reset, an
    /// abort, a broken pipe, a timeout), rather than by an ordinary close.
    pub fn gateway_failed(&self) -> bool {
        self.gateway
            && matches!(
                self.error.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
            )
    }
}

/// Forwards between two TCP streams until both directions have ended (half-closes are
/// passed on) or either side fails. `up` and `down` count the bytes as they go.
///
/// Hand-written rather than two `async` loops: it waits through the sockets' own registered
/// wakers, so an idle session's whole forwarding state is about a hundred bytes (two `async`
/// pumps with their readiness futures take ~750).
///
/// `splice`: `Off` copies through a per-thread buffer; `On` moves every chunk with
/// `splice(2)` ([`crate::splice`]); `Auto` copies until a read fills the whole buffer (a bulk
/// transfer), then splices that direction from then on.
pub fn tcp<'a>(
    device: &'a mut TcpStream,
    gateway: &'a mut TcpStream,
    up: &'a Total,
    down: &'a Total,
    splice: SpliceMode,
) -> Tcp<'a> {
    let (device_read, device_write) = device.split();
    let (gateway_read, gateway_write) = gateway.split();
    Tcp {
        up: Direction::new(device_read, gateway_write, up, false, splice),
        down: Direction::new(gateway_read, device_write, down, true, splice),
    }
}

pub use wasmbed_config::proxy::SpliceMode;

/// The future [`tcp`] returns.
pub struct Tcp<'a> {
    up: Direction<'a>,
    down: Direction<'a>,
}

impl Future for Tcp<'_> {
    type Output = Result<(), Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        let this = &mut *self;
        let up = this.up.poll(cx)?;
        let down = this.down.poll(cx)?;
        if up.is_ready() && down.is_ready() {
            // Both ends closed: dropping the sockets closes them; no half-close to pass on.
            return Poll::Ready(Ok(()));
        }
        // One end closed: pass the half-close on. Deciding here, after both directions were
        // polled, saves the shutdown when both ends close at once (the common case).
        this.up.pass_on_eof(cx);
        this.down.pass_on_eof(cx);
        Poll::Pending
    }
}

/// One direction: read from `src`, write to `dst`; on end of stream, shut `dst`'s write half.
struct Direction<'a> {
    src: ReadHalf<'a>,
    dst: WriteHalf<'a>,
    total: &'a Total,
    /// Bytes read but not yet taken by `dst` (empty, and unallocated, while `dst` keeps up).
    backlog: Vec<u8>,
    sent: usize,
    done: bool,
    /// `src` ended and `dst` has not been told yet.
    eof_to_pass: bool,
    /// `src` is the gateway (the gateway -> device direction).
    from_gateway: bool,
    /// Splicing (from the start, or since a read filled the buffer).
    pipes: Option<Box<crate::splice::Pipes>>,
    /// Switch to splicing after a full read.
    auto: bool,
}

impl<'a> Direction<'a> {
    fn new(
        src: ReadHalf<'a>,
        dst: WriteHalf<'a>,
        total: &'a Total,
        from_gateway: bool,
        splice: SpliceMode,
    ) -> Self {
        Direction {
            from_gateway,
            src,
            dst,
            total,
            backlog: Vec::new(),
            sent: 0,
            done: false,
            eof_to_pass: false,
            pipes: (splice == SpliceMode::On).then(Box::default),
            auto: splice == SpliceMode::Auto,
        }
    }

    /// Shuts `dst`'s write half if `src` ended; the peer may already be gone, and its own
    /// direction reports that.
    fn pass_on_eof(&mut self, cx: &mut Context<'_>) {
        if std::mem::take(&mut self.eof_to_pass) {
            let _ = Pin::new(&mut self.dst).poll_shutdown(cx);
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        // Read errors are `src`'s side's, write errors `dst`'s.
        let from_gateway = self.from_gateway;
        let on_src = |error| Failure {
            gateway: from_gateway,
            error,
        };
        let on_dst = |error| Failure {
            gateway: !from_gateway,
            error,
        };
        while !self.done {
            ready!(self.flush(cx)).map_err(on_dst)?;
            if let Some(pipes) = &mut self.pipes {
                let (src, dst): (&TcpStream, &TcpStream) = (self.src.as_ref(), self.dst.as_ref());
                match ready!(pipes.poll(src, dst, self.total, cx)) {
                    Ok(()) => {
                        self.done = true;
                        self.eof_to_pass = true;
                    }
                    Err(crate::splice::Side::Src(e)) => return Poll::Ready(Err(on_src(e))),
                    Err(crate::splice::Side::Dst(e)) => return Poll::Ready(Err(on_dst(e))),
                }
                continue;
            }
            let (src, dst, backlog) = (&mut self.src, &mut self.dst, &mut self.backlog);
            let read = BUFFER.with(|cell| {
                let mut buf = cell.borrow_mut();
                let mut filled = ReadBuf::new(&mut buf);
                // A partial read tells tokio the socket is drained: no extra read to find out.
                ready!(Pin::new(src).poll_read(cx, &mut filled)).map_err(on_src)?;
                let n = filled.filled().len();
                let written = write_now(dst, cx, &buf[..n]).map_err(on_dst)?;
                if written < n {
                    *backlog = buf[written..n].to_vec();
                }
                Poll::Ready(Ok(n))
            });
            match ready!(read)? {
                0 => {
                    self.done = true;
                    self.eof_to_pass = true;
                }
                n => {
                    self.sent = 0;
                    self.total.add(n as u64);
                    // A read that filled the buffer: a bulk transfer, spliced from now on.
                    if self.auto && n == CHUNK {
                        self.pipes = Some(Box::default());
                    }
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the backlog, if any, then frees it.
    fn flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.backlog.len() {
            let n = ready!(Pin::new(&mut self.dst).poll_write(cx, &self.backlog[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if !self.backlog.is_empty() {
            self.backlog = Vec::new();
            self.sent = 0;
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes as much of `bytes` as the socket takes now; when it is full, `cx` is woken once it
/// has room again.
fn write_now(dst: &mut WriteHalf<'_>, cx: &mut Context<'_>, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match Pin::new(&mut *dst).poll_write(cx, &bytes[written..]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => written += n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok(written)
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
            let (mut device_side, mut gateway_side) = (device_side, gateway_side);
            let (u, d) = (AtomicU64::new(0), AtomicU64::new(0));
            tcp(&mut device_side, &mut gateway_side, &u, &d)
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
            let (mut device_side, mut gateway_side) = (device_side, gateway_side);
            let (u, d) = (AtomicU64::new(0), AtomicU64::new(0));
            tcp(&mut device_side, &mut gateway_side, &u, &d).await
        });
        socket2::SockRef::from(&gateway)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(gateway); // RST
        let r = relay.await.unwrap().unwrap_err();
        assert_eq!(r.error.kind(), io::ErrorKind::ConnectionReset);
        assert!(
            r.gateway && r.gateway_failed(),
            "the gateway's side failed: {r}"
        );
        let mut rest = Vec::new();
        assert_eq!(
            device.read_to_end(&mut rest).await.unwrap(),
            0,
            "device sees the close"
        );
    }
}
