//! forward: bytes both ways between a device and its gateway, until either side closes.
//!
//! For plain TCP pairs (passthrough) each direction waits for readiness holding no buffer,
//! then reads into a per-thread buffer and writes straight on; only when the other side's
//! socket is full does a direction keep the unsent bytes, and it frees them once sent. An
//! idle session therefore holds no copy buffer at all: its cost is the task and two sockets.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};

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
pub async fn tcp(
    device: &TcpStream,
    gateway: &TcpStream,
    up: &AtomicU64,
    down: &AtomicU64,
) -> io::Result<()> {
    tokio::try_join!(pump(device, gateway, up), pump(gateway, device, down))?;
    Ok(())
}

/// One direction: read from `src`, write to `dst`; on end of stream, shut `dst`'s write half.
async fn pump(src: &TcpStream, dst: &TcpStream, total: &AtomicU64) -> io::Result<()> {
    loop {
        src.readable().await?;
        let step = BUFFER.with(|cell| {
            let mut buf = cell.borrow_mut();
            match src.try_read(&mut buf) {
                Ok(0) => Ok(Step::Eof),
                Ok(n) => match write_now(dst, &buf[..n]) {
                    Ok(written) if written == n => Ok(Step::Sent(n)),
                    Ok(written) => Ok(Step::Backlog(n, buf[written..n].to_vec())),
                    Err(e) => Err(e),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Step::Spurious),
                Err(e) => Err(e),
            }
        })?;
        match step {
            Step::Eof => {
                // The peer may already be gone; its own direction reports that.
                let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
                return Ok(());
            }
            Step::Spurious => {}
            Step::Sent(n) => {
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
            Step::Backlog(n, rest) => {
                write_all(dst, &rest).await?;
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

enum Step {
    Eof,
    Spurious,
    Sent(usize),
    /// Read `n` bytes, of which these were not written yet.
    Backlog(usize, Vec<u8>),
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
