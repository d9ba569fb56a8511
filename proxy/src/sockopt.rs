//! `TCP_DEFER_ACCEPT` on a listening socket: the one socket option the proxy sets that none of
//! socket2, rustix or nix wraps for Linux.
//!
//! What it does: the kernel completes a device's TCP handshake as usual, but queues the
//! connection for `accept` only once its first bytes arrive (for devices, the ClientHello).
//! A connection that has sent nothing stays the kernel's (a request socket, a few hundred
//! bytes, no descriptor); after `[[listener]] defer_accept` (1 s by default) the kernel queues
//! it anyway, on the device's answer to a repeated SYN-ACK, and the proxy's
//! `handshake_timeout` takes it from there. The proxy reads a device's first bytes before it
//! does anything else in every mode, so no protocol waits on this; what it saves is a
//! wake-up per connection (docs/performance.md, "Accepting once the hello is there").
//!
//! Why `unsafe`, and only here: `setsockopt(2)` takes a pointer to the option's value. The
//! call passes a pointer to a local `c_int` and that value's size; the kernel only reads it,
//! and the descriptor is borrowed for the call.

#![allow(unsafe_code, reason = "setsockopt(2): see the module's documentation")]

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

/// Sets `TCP_DEFER_ACCEPT` on a listening socket to `wait`, in whole seconds (a fraction
/// rounds up; Linux then rounds up to its SYN-ACK schedule: 1, 3, 7, 15, 31, 63 s), or clears
/// it (zero). A no-op where the option does not exist (not Linux): connections are accepted
/// at once.
pub fn defer_accept(socket: &impl AsFd, wait: Duration) -> io::Result<()> {
    let seconds = wait
        .as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0));
    imp::defer_accept(socket, seconds).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("setting TCP_DEFER_ACCEPT ({seconds} s): {e}"),
        )
    })
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use std::io;
    use std::os::fd::{AsFd, AsRawFd};

    pub fn defer_accept(socket: &impl AsFd, seconds: u64) -> io::Result<()> {
        let value = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
        let fd = socket.as_fd();
        // SAFETY: `fd` is a descriptor borrowed for the call; the value pointer and length
        // describe `value`, a live local the kernel only reads.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    pub fn defer_accept(_socket: &impl std::os::fd::AsFd, _seconds: u64) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
mod tests {
    use super::*;

    /// What the kernel reads back (it stores a count of SYN-ACKs and converts back to
    /// seconds on its schedule): set, rounded, cleared.
    #[test]
    fn sets_and_clears_the_option() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let read = |l: &std::net::TcpListener| {
            let mut value: libc::c_int = -1;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: as above, with the kernel writing `value` and `len`, both live locals.
            let rc = unsafe {
                libc::getsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(l),
                    libc::IPPROTO_TCP,
                    libc::TCP_DEFER_ACCEPT,
                    (&raw mut value).cast(),
                    &raw mut len,
                )
            };
            assert_eq!(rc, 0);
            value
        };
        assert_eq!(read(&listener), 0);
        for (wait, kernel) in [(1000, 1), (1, 1), (2500, 3), (5000, 7), (0, 0)] {
            defer_accept(&listener, Duration::from_millis(wait)).unwrap();
            assert_eq!(read(&listener), kernel, "{wait} ms");
        }
    }
}
