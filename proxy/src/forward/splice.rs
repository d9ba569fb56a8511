//! splice: forwarding inside the kernel for passthrough TCP (`--splice on|auto`): each chunk
//! goes socket → pipe → socket with `splice(2)`, never copied to user space.
//!
//! A pipe is held only while a direction has bytes in flight: it is taken from a per-thread
//! pool when the source is readable and given back as soon as the destination took everything
//! (a pipe with bytes left in it is closed, never reused). An idle session therefore holds no
//! pipe, and its descriptors stay two. `try_io` clears a socket's readiness when the kernel
//! says it would block, and the task waits on the sockets' own wakers, as
//! [`crate::forward::tcp`] does when it copies.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::task::{Context, Poll, ready};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::Count;

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
    static TAKEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Pipes taken (made or from the pool) by splicing on this thread: for tests, whose sessions
/// run on their own thread, where the process's open pipes also count other tests' pools.
pub fn taken_on_this_thread() -> u64 {
    TAKEN.with(|t| t.get())
}

fn take_pipe() -> io::Result<Pipe> {
    TAKEN.with(|t| t.set(t.get() + 1));
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

/// Which side an error came from.
pub(crate) enum Side {
    Src(io::Error),
    Dst(io::Error),
}

/// One direction's splicing state: the pipe holding bytes on their way, and how many.
#[derive(Default)]
pub(crate) struct Pipes {
    pipe: Option<Pipe>,
    in_pipe: usize,
}

impl Pipes {
    /// Moves bytes from `src` to `dst` until `src` ends (`Ready(Ok(()))`), either side fails,
    /// or there is nothing to do now (`Pending`, with `cx` registered where it must be).
    pub(crate) fn poll(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        total: &dyn Count,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Side>> {
        loop {
            // Empty the pipe into the destination first.
            while self.in_pipe > 0 {
                let Some(pipe) = &self.pipe else { break };
                let moved = dst.try_io(Interest::WRITABLE, || {
                    splice(&pipe.read, None, dst, None, self.in_pipe, flags())
                        .map_err(io::Error::from)
                });
                match moved {
                    Ok(0) => return Poll::Ready(Err(Side::Dst(io::ErrorKind::WriteZero.into()))),
                    Ok(n) => self.in_pipe -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(dst.poll_write_ready(cx)).map_err(Side::Dst)?;
                    }
                    Err(e) => return Poll::Ready(Err(Side::Dst(e))),
                }
            }
            if let Some(pipe) = self.pipe.take() {
                give_back(pipe);
            }
            ready!(src.poll_read_ready(cx)).map_err(Side::Src)?;
            let pipe = take_pipe().map_err(Side::Src)?;
            let moved = src.try_io(Interest::READABLE, || {
                splice(src, None, &pipe.write, None, CHUNK, flags()).map_err(io::Error::from)
            });
            match moved {
                Ok(0) => {
                    give_back(pipe);
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    total.add(n as u64);
                    self.in_pipe = n;
                    self.pipe = Some(pipe);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => give_back(pipe),
                Err(e) => {
                    give_back(pipe);
                    return Poll::Ready(Err(Side::Src(e)));
                }
            }
        }
    }
}
