//! The data plane's system calls, made without glibc's cancellation bookkeeping.
//!
//! Why: in a process with more than one thread, glibc wraps every call that POSIX names a
//! cancellation point (`recv`, `send`, `epoll_wait`, `accept4`, `connect`, `close`, `read`,
//! `write`, ...) in `__pthread_enable_asynccancel` and `__pthread_disable_asynccancel`: two
//! atomic compare-and-swaps on the thread's cancellation word around the system call, there
//! for `pthread_cancel`. Nothing in this process cancels a thread (Rust has no
//! `pthread_cancel`), but a proxy has its probe, admin and timer threads beside the data
//! plane, so every call pays: a TLS passthrough connection makes ~32 such calls, ~1k of its
//! ~25k user-mode instructions and 64 locked instructions (docs/performance.md, "System calls
//! without cancellation points"). NGINX's workers have one thread, for which glibc skips
//! the bookkeeping.
//!
//! What: the binary is linked with `--wrap` for each function below (`build.rs`), so that
//! every call to it in the program (tokio's, mio's, std's, quinn's and ours; glibc's own
//! internal calls are not affected) reaches the `__wrap_` function here instead. That makes the
//! same system call with the same arguments glibc would, and reports an error the way glibc
//! does: -1, with the error in `errno`. Only the cancellation point is gone. On targets other
//! than 64-bit x86 Linux with glibc, `build.rs` adds no `--wrap` and these functions are not
//! built. The cancellation points the binary still takes from glibc are not the data plane's
//! (`poll`, `open`, `nanosleep`, `waitpid`: start-up, files, `up`'s children).
//!
//! Why `unsafe`, and only here: a system call is `unsafe` by nature (the kernel reads and
//! writes the caller's pointers), and exporting an unmangled C function is `unsafe` in Rust
//! 2024. Each function hands the pointers it was given to the kernel unchanged, exactly as the
//! glibc function it replaces would; it reads and writes no memory itself but `errno`.

#![allow(unsafe_code, reason = "system calls: see the module's documentation")]

use core::arch::asm;
use libc::{c_int, c_long, c_uint, c_void, iovec, mmsghdr, msghdr, size_t, sockaddr, socklen_t};
use libc::{epoll_event, ssize_t, timespec};

/// A system call with six arguments (unused ones are ignored by the kernel), as glibc's
/// `INLINE_SYSCALL` makes it on x86-64: the number in `rax`, the arguments in `rdi`, `rsi`,
/// `rdx`, `r10`, `r8`, `r9`; the kernel returns the result in `rax` and clobbers `rcx` and
/// `r11`.
///
/// # Safety
/// The arguments must be valid for system call `nr`, as for the glibc function that makes it.
#[inline(always)]
unsafe fn syscall6(nr: c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller's contract; the asm touches only the registers declared.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack, preserves_flags),
        );
    }
    ret
}

/// glibc's convention for a raw result: a value in [-4095, -1] is an error number, set in
/// `errno`, and the call returns -1.
#[inline(always)]
fn result(ret: isize) -> isize {
    if (-4095..0).contains(&ret) {
        // SAFETY: `__errno_location` returns this thread's `errno`, valid for the thread's life.
        unsafe { *libc::__errno_location() = -ret as c_int };
        -1
    } else {
        ret
    }
}

/// The call `nr` with `a` as its arguments, and glibc's convention for its result.
///
/// # Safety
/// As [`syscall6`].
#[inline(always)]
unsafe fn call(nr: c_long, a: [usize; 6]) -> isize {
    // SAFETY: the caller's contract.
    result(unsafe { syscall6(nr, a) })
}

/// Defines each `__wrap_` function: its C signature, and the system call it makes with which of
/// its arguments (every argument passed to the kernel as a word, as glibc's `INLINE_SYSCALL`
/// does; the unused ones zero). The caller's contract is the C function's of the same name:
/// the kernel checks the pointers and reports EFAULT for a bad one, as it does for glibc's call.
macro_rules! wrap {
    ($(
        $(#[$meta:meta])*
        fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $nr:ident($($word:expr),*);
    )*) => {$(
        $(#[$meta])*
        #[unsafe(no_mangle)]
        #[allow(clippy::unnecessary_cast, reason = "arguments of every type become words")]
        unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            let mut words = [0usize; 6];
            let given = [$($word as usize),*];
            words[..given.len()].copy_from_slice(&given);
            // SAFETY: the kernel gets the arguments the glibc function would give it.
            unsafe { call(libc::$nr, words) as $ret }
        }
    )*};
}

/// No address: glibc makes `recv` a `recvfrom` and `send` a `sendto` without one (x86-64 has
/// no `recv` or `send` system call).
const NO_ADDRESS: usize = 0;

wrap! {
    fn __wrap_recv(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t
        = SYS_recvfrom(fd, buf, len, flags, NO_ADDRESS, NO_ADDRESS);
    fn __wrap_send(fd: c_int, buf: *const c_void, len: size_t, flags: c_int) -> ssize_t
        = SYS_sendto(fd, buf, len, flags, NO_ADDRESS, NO_ADDRESS);
    fn __wrap_recvfrom(
        fd: c_int,
        buf: *mut c_void,
        len: size_t,
        flags: c_int,
        addr: *mut sockaddr,
        addrlen: *mut socklen_t
    ) -> ssize_t = SYS_recvfrom(fd, buf, len, flags, addr, addrlen);
    fn __wrap_sendto(
        fd: c_int,
        buf: *const c_void,
        len: size_t,
        flags: c_int,
        addr: *const sockaddr,
        addrlen: socklen_t
    ) -> ssize_t = SYS_sendto(fd, buf, len, flags, addr, addrlen);
    fn __wrap_recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t
        = SYS_recvmsg(fd, msg, flags);
    fn __wrap_sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t
        = SYS_sendmsg(fd, msg, flags);
    /// x86-64's `timespec` is the kernel's (64-bit `time_t`): passed as it is.
    fn __wrap_recvmmsg(
        fd: c_int,
        msgs: *mut mmsghdr,
        vlen: c_uint,
        flags: c_int,
        timeout: *mut timespec
    ) -> c_int = SYS_recvmmsg(fd, msgs, vlen, flags, timeout);
    fn __wrap_read(fd: c_int, buf: *mut c_void, count: size_t) -> ssize_t
        = SYS_read(fd, buf, count);
    fn __wrap_write(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t
        = SYS_write(fd, buf, count);
    fn __wrap_writev(fd: c_int, iov: *const iovec, iovcnt: c_int) -> ssize_t
        = SYS_writev(fd, iov, iovcnt);
    /// `--splice`: every chunk of a spliced bulk transfer.
    fn __wrap_splice(
        fd_in: c_int,
        off_in: *mut libc::loff_t,
        fd_out: c_int,
        off_out: *mut libc::loff_t,
        len: size_t,
        flags: c_uint
    ) -> ssize_t = SYS_splice(fd_in, off_in, fd_out, off_out, len, flags);
    fn __wrap_epoll_wait(epfd: c_int, events: *mut epoll_event, maxevents: c_int, timeout: c_int)
        -> c_int = SYS_epoll_wait(epfd, events, maxevents, timeout);
    fn __wrap_accept4(fd: c_int, addr: *mut sockaddr, addrlen: *mut socklen_t, flags: c_int)
        -> c_int = SYS_accept4(fd, addr, addrlen, flags);
    fn __wrap_connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int
        = SYS_connect(fd, addr, len);
    fn __wrap_close(fd: c_int) -> c_int = SYS_close(fd);
}

#[cfg(test)]
mod tests {
    //! Each function against what the kernel does, called directly (whether the binary's calls
    //! reach them is `tests/syscalls.rs`'s): results, and errors as glibc reports them.

    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

    fn errno() -> c_int {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// How long a call that should return at once may block before the test fails instead of
    /// hanging.
    const BOUND: std::time::Duration = std::time::Duration::from_secs(10);

    /// A connected pair of TCP sockets on 127.0.0.1, the accepted one non-blocking.
    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server)
    }

    #[test]
    fn recv_and_send_move_bytes_and_report_errors_in_errno() {
        let (mut client, server) = tcp_pair();
        let mut buf = [0u8; 16];
        let fd = server.as_raw_fd();
        // SAFETY: `buf` is valid for its length; `fd` is open.
        let empty = unsafe { __wrap_recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert_eq!((empty, errno()), (-1, libc::EAGAIN));
        client.write_all(b"hello").unwrap();
        // Blocking now: the call waits for all five bytes (within BOUND).
        server.set_nonblocking(false).unwrap();
        server.set_read_timeout(Some(BOUND)).unwrap();
        // SAFETY: as above.
        let n = unsafe { __wrap_recv(fd, buf.as_mut_ptr().cast(), 5, libc::MSG_WAITALL) };
        assert_eq!(&buf[..n as usize], b"hello");
        let reply = b"world";
        // SAFETY: `reply` is valid for its length.
        let sent =
            unsafe { __wrap_send(fd, reply.as_ptr().cast(), reply.len(), libc::MSG_NOSIGNAL) };
        assert_eq!(sent, 5);
        let mut got = [0u8; 5];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, reply);
        // SAFETY: -1 is no descriptor: the kernel refuses it.
        let bad = unsafe { __wrap_send(-1, reply.as_ptr().cast(), reply.len(), 0) };
        assert_eq!((bad, errno()), (-1, libc::EBADF));
    }

    #[test]
    fn datagrams_carry_their_addresses_through_sendto_recvfrom_sendmsg_recvmsg_recvmmsg() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(BOUND)).unwrap();
        let b_addr = match b.local_addr().unwrap() {
            std::net::SocketAddr::V4(v4) => v4,
            std::net::SocketAddr::V6(_) => unreachable!("bound to 127.0.0.1"),
        };
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: b_addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*b_addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as socklen_t;
        // SAFETY: the buffer and the address are valid for their lengths.
        let sent = unsafe {
            __wrap_sendto(
                a.as_raw_fd(),
                b"one".as_ptr().cast(),
                3,
                0,
                (&raw const to).cast(),
                len,
            )
        };
        assert_eq!(sent, 3);
        let mut buf = [0u8; 8];
        // SAFETY: `from` and `from_len` describe a sockaddr_in the kernel may fill.
        let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut from_len = len;
        // SAFETY: as above; `b` is blocking, and the datagram was sent.
        let got = unsafe {
            __wrap_recvfrom(
                b.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &raw mut from_len,
            )
        };
        assert_eq!(&buf[..got as usize], b"one");
        assert_eq!(u16::from_be(from.sin_port), a.local_addr().unwrap().port());

        // sendmsg, then recvmsg of one datagram and recvmmsg of the next.
        a.connect(b.local_addr().unwrap()).unwrap();
        for payload in [b"two", b"six"] {
            let mut iov = iovec {
                iov_base: payload.as_ptr() as *mut c_void,
                iov_len: payload.len(),
            };
            // SAFETY: a zeroed msghdr is "no address, no control data".
            let mut msg: msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            // SAFETY: `msg` points at one valid iovec.
            assert_eq!(
                unsafe { __wrap_sendmsg(a.as_raw_fd(), &raw const msg, 0) },
                3
            );
        }
        let mut iov = iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: as above.
        let mut msg: msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        // SAFETY: `msg` points at one iovec over `buf`.
        let got = unsafe { __wrap_recvmsg(b.as_raw_fd(), &raw mut msg, 0) };
        assert_eq!(&buf[..got as usize], b"two");
        let mut iov = iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: a zeroed mmsghdr is an empty header and length.
        let mut msgs: [mmsghdr; 1] = unsafe { std::mem::zeroed() };
        msgs[0].msg_hdr.msg_iov = &raw mut iov;
        msgs[0].msg_hdr.msg_iovlen = 1;
        // SAFETY: one header, over `buf`; no timeout.
        let n = unsafe {
            __wrap_recvmmsg(b.as_raw_fd(), msgs.as_mut_ptr(), 1, 0, std::ptr::null_mut())
        };
        assert_eq!(n, 1);
        assert_eq!(&buf[..msgs[0].msg_len as usize], b"six");
        b.set_nonblocking(true).unwrap();
        // SAFETY: as above.
        let empty = unsafe {
            __wrap_recvmmsg(b.as_raw_fd(), msgs.as_mut_ptr(), 1, 0, std::ptr::null_mut())
        };
        assert_eq!((empty, errno()), (-1, libc::EAGAIN));
    }

    /// A pipe's two ends.
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) },
            0
        );
        // SAFETY: both were just opened, and are owned here only.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn read_write_writev_splice_and_epoll_wait_see_pipes() {
        let (r, w) = pipe();
        // SAFETY: plain calls; the events buffer is valid for one entry.
        unsafe {
            let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            assert!(ep >= 0, "epoll_create1: {}", errno());
            let ep = OwnedFd::from_raw_fd(ep);
            let mut add = epoll_event {
                events: libc::EPOLLIN as u32,
                u64: 7,
            };
            assert_eq!(
                libc::epoll_ctl(
                    ep.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    r.as_raw_fd(),
                    &raw mut add
                ),
                0
            );
            let mut out = [epoll_event { events: 0, u64: 0 }];
            assert_eq!(__wrap_epoll_wait(ep.as_raw_fd(), out.as_mut_ptr(), 1, 0), 0);
            let mut buf = [0u8; 16];
            let empty = __wrap_read(r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
            assert_eq!((empty, errno()), (-1, libc::EAGAIN));
            assert_eq!(__wrap_write(w.as_raw_fd(), b"ab".as_ptr().cast(), 2), 2);
            let parts = [
                iovec {
                    iov_base: b"cd".as_ptr() as *mut c_void,
                    iov_len: 2,
                },
                iovec {
                    iov_base: b"ef".as_ptr() as *mut c_void,
                    iov_len: 2,
                },
            ];
            assert_eq!(__wrap_writev(w.as_raw_fd(), parts.as_ptr(), 2), 4);
            assert_eq!(
                __wrap_epoll_wait(
                    ep.as_raw_fd(),
                    out.as_mut_ptr(),
                    1,
                    BOUND.as_millis() as c_int
                ),
                1
            );
            let data = out[0].u64;
            assert_eq!(data, 7);
            let n = __wrap_read(r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
            assert_eq!(&buf[..n as usize], b"abcdef");
            let bad = __wrap_epoll_wait(r.as_raw_fd(), out.as_mut_ptr(), 1, 0);
            assert_eq!((bad, errno()), (-1, libc::EINVAL));
            // splice: from this pipe into another, then from the emptied one.
            let (r2, w2) = pipe();
            assert_eq!(__wrap_write(w.as_raw_fd(), b"gh".as_ptr().cast(), 2), 2);
            let null = std::ptr::null_mut();
            let moved = __wrap_splice(r.as_raw_fd(), null, w2.as_raw_fd(), null, 16, 0);
            assert_eq!(moved, 2);
            let n = __wrap_read(r2.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
            assert_eq!(&buf[..n as usize], b"gh");
            let nothing = __wrap_splice(
                r.as_raw_fd(),
                null,
                w2.as_raw_fd(),
                null,
                16,
                libc::SPLICE_F_NONBLOCK,
            );
            assert_eq!((nothing, errno()), (-1, libc::EAGAIN));
        }
    }

    #[test]
    fn accept4_connect_and_close_open_and_end_a_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = match listener.local_addr().unwrap() {
            std::net::SocketAddr::V4(v4) => v4,
            std::net::SocketAddr::V6(_) => unreachable!("bound to 127.0.0.1"),
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as socklen_t;
        // SAFETY: plain calls; each address is a valid sockaddr_in of `len` bytes.
        unsafe {
            let mut peer: libc::sockaddr_in = std::mem::zeroed();
            let mut peer_len = len;
            let none = __wrap_accept4(
                listener.as_raw_fd(),
                (&raw mut peer).cast(),
                &raw mut peer_len,
                0,
            );
            assert_eq!((none, errno()), (-1, libc::EAGAIN));
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: addr.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*addr.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            assert_eq!(__wrap_connect(fd, (&raw const to).cast(), len), 0);
            let client = TcpStream::from_raw_fd(fd);
            // Blocking now (within BOUND): the connection made above is queued.
            listener.set_nonblocking(false).unwrap();
            let bound = libc::timeval {
                tv_sec: BOUND.as_secs() as libc::time_t,
                tv_usec: 0,
            };
            let set = libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const bound).cast(),
                std::mem::size_of::<libc::timeval>() as socklen_t,
            );
            assert_eq!(set, 0);
            let accepted = __wrap_accept4(
                listener.as_raw_fd(),
                (&raw mut peer).cast(),
                &raw mut peer_len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            );
            assert!(accepted >= 0, "accept4: {}", errno());
            assert_eq!(
                u16::from_be(peer.sin_port),
                client.local_addr().unwrap().port()
            );
            // The flags were passed on: the accepted socket is non-blocking.
            assert_ne!(libc::fcntl(accepted, libc::F_GETFL) & libc::O_NONBLOCK, 0);
            // A second connect reports its error too.
            let again = __wrap_connect(fd, (&raw const to).cast(), len);
            assert_eq!((again, errno()), (-1, libc::EISCONN));
            assert_eq!(__wrap_close(accepted), 0);
            // Not `accepted` again: another test's thread may have been given its number.
            let closed = __wrap_close(-1);
            assert_eq!((closed, errno()), (-1, libc::EBADF));
            let _ = client.into_raw_fd();
            assert_eq!(__wrap_close(fd), 0);
        }
    }
}
