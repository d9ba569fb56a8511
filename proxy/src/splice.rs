//! splice: passthrough forwarding inside the kernel (`--splice on`): each chunk goes socket →
//! pipe → socket with `splice(2)`, never copied to user space.
//!
//! A pipe is held only while a direction has bytes in flight: it is taken from a per-thread
//! pool when the source is readable and given back as soon as the destination took everything
//! (a pipe with bytes left in it is closed, never reused). An idle session therefore holds no
//! pipe, and its descriptors stay two. Same readiness model as [`crate::forward::tcp`]:
//! `try_io` clears a socket's readiness when the kernel says it would block, and the task
//! waits on the sockets' own wakers. Half-closes are passed on.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::forward::{Count, Failure};

/// Most bytes moved by one splice into a pipe (a pipe holds 64 KiB by default).
const CHUNK: usize = 64 * 1024;
/// Empty pipes kept per thread for the next chunk.
const POOL: usize = 64;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

fn take_pipe() -> io::Result<Pipe> {
    if let Some(p) = PIPES.with(|pool| pool.borrow_mut().pop()) {
        return Ok(p);
    }
    let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    Ok(Pipe { read, write })
}

/// Back to the pool; only an empty pipe may come back.
fn give_back(pipe: Pipe) {
    PIPES.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL {
            pool.push(pipe);
        }
    });
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Forwards between two TCP streams with `splice(2)` until both directions ended (half-closes
/// passed on) or either side fails; `up` and `down` count the bytes as they go.
pub fn tcp<'a>(
    device: &'a TcpStream,
    gateway: &'a TcpStream,
    up: &'a dyn Count,
    down: &'a dyn Count,
) -> Spliced<'a> {
    Spliced {
        up: Direction::new(device, gateway, up, false),
        down: Direction::new(gateway, device, down, true),
    }
}

/// The future [`tcp`] returns.
pub struct Spliced<'a> {
    up: Direction<'a>,
    down: Direction<'a>,
}

impl Future for Spliced<'_> {
    type Output = Result<(), Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        let this = &mut *self;
        let up = this.up.poll(cx)?;
        let down = this.down.poll(cx)?;
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(Ok(()));
        }
        this.up.pass_on_eof();
        this.down.pass_on_eof();
        Poll::Pending
    }
}

struct Direction<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    total: &'a dyn Count,
    /// The pipe holding bytes on their way, and how many.
    pipe: Option<Pipe>,
    in_pipe: usize,
    done: bool,
    eof_to_pass: bool,
    from_gateway: bool,
}

impl<'a> Direction<'a> {
    fn new(
        src: &'a TcpStream,
        dst: &'a TcpStream,
        total: &'a dyn Count,
        from_gateway: bool,
    ) -> Self {
        Direction {
            src,
            dst,
            total,
            pipe: None,
            in_pipe: 0,
            done: false,
            eof_to_pass: false,
            from_gateway,
        }
    }

    fn pass_on_eof(&mut self) {
        if std::mem::take(&mut self.eof_to_pass) {
            let _ = socket2::SockRef::from(self.dst).shutdown(std::net::Shutdown::Write);
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
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
            // Empty the pipe into the destination first.
            while self.in_pipe > 0 {
                let Some(pipe) = &self.pipe else { break };
                let moved = self.dst.try_io(Interest::WRITABLE, || {
                    splice(&pipe.read, None, self.dst, None, self.in_pipe, flags())
                        .map_err(io::Error::from)
                });
                match moved {
                    Ok(0) => return Poll::Ready(Err(on_dst(io::ErrorKind::WriteZero.into()))),
                    Ok(n) => self.in_pipe -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(self.dst.poll_write_ready(cx)).map_err(on_dst)?;
                    }
                    Err(e) => return Poll::Ready(Err(on_dst(e))),
                }
            }
            if let Some(pipe) = self.pipe.take() {
                give_back(pipe);
            }
            ready!(self.src.poll_read_ready(cx)).map_err(on_src)?;
            let pipe = take_pipe().map_err(on_src)?;
            let moved = self.src.try_io(Interest::READABLE, || {
                splice(self.src, None, &pipe.write, None, CHUNK, flags()).map_err(io::Error::from)
            });
            match moved {
                Ok(0) => {
                    give_back(pipe);
                    self.done = true;
                    self.eof_to_pass = true;
                }
                Ok(n) => {
                    self.total.add(n as u64);
                    self.in_pipe = n;
                    self.pipe = Some(pipe);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => give_back(pipe),
                Err(e) => {
                    give_back(pipe);
                    return Poll::Ready(Err(on_src(e)));
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}
