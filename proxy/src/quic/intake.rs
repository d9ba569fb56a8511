//! intake: the QUIC device listener's socket, with newcomers queued apart from the
//! connections already under way, as TCP has them apart in the kernel (a SYN and accept
//! queue of their own, each established socket's data in its own buffer).
//!
//! A UDP socket has one kernel queue, served in arrival order. In a reconnect storm thousands
//! of Initials (1,200 bytes each, padded) arrive in the same second and queue ahead of the
//! last flight of the handshakes already admitted, and ahead of the DATA of the devices
//! already back: the proxy's queue held 15–26 MB at a 9,000-device storm's start. An
//! admitted handshake then holds its slot of `--max-handshakes` until its device's Finished
//! has waited through that queue, so the slots finish fewer handshakes a second, and the
//! devices behind them wait in line or are refused.
//!
//! [`Intake`] reads the kernel's queue ahead of quinn. A datagram that opens a connection
//! ([`opens_connection`]: a QUIC v1 Initial not followed by a Handshake packet) is set aside;
//! everything else goes to quinn at once, in order. The set-aside datagrams go to quinn when
//! the kernel has nothing else (or after [`READS_BEFORE_NEWCOMERS`] reads that found only
//! newcomers), **newest first**: under a backlog the oldest have waited past their device's
//! probe timeout and been sent again, and serving the fresh copy first keeps the time a
//! served device waited short (the adaptive-LIFO of overloaded RPC servers). At most
//! [`MAX_HELD_BYTES`] are held; past it the oldest are dropped and counted
//! (`wasmbed_proxy_quic_initials_dropped_total`): their devices send them again, as they
//! would after a drop in the kernel.
//!
//! What a peer can do with it: a flood of Initials only ever waits behind other traffic and
//! is bounded; a datagram crafted to look like a continuing handshake skips the newcomers'
//! queue, which gains it what any 1-RTT datagram has anyway (quinn drops what matches no
//! connection). A client Initial that only acknowledges (sent alone) is set aside too: the
//! server's Initial it acknowledges is retransmitted if needed.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use metrics::{counter, gauge};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::metric_names::{QUIC_INITIALS_DROPPED, QUIC_INITIALS_HELD};

/// Bytes of newcomers' datagrams held at most (about 7,000 Initials): what the kernel's
/// queue holds for a 9,000-device storm, moved here; past it the oldest are dropped.
pub const MAX_HELD_BYTES: usize = 8 << 20;

/// Reads from the kernel in one poll that may find only newcomers before held ones are
/// served: the kernel's queue is searched ahead for continuing handshakes and established
/// traffic, four batches (quinn's: 32 datagrams each) a poll, while newcomers are served a
/// batch at a time.
pub const READS_BEFORE_NEWCOMERS: usize = 4;

/// A QUIC version 1 long-header packet's type, in the first byte's bits 4–5.
const INITIAL: u8 = 0;
const HANDSHAKE: u8 = 2;

/// Whether `datagram` opens a connection (or may): its first packet is a QUIC v1 Initial
/// and no Handshake packet follows it. A client's last flight coalesces its Initial
/// (an acknowledgement) with its Handshake packet (the Finished), so it is not a newcomer.
/// Anything unparsable after an Initial's first byte and version counts as a newcomer:
/// the lowest priority is the safe side for bytes quinn will drop.
pub fn opens_connection(datagram: &[u8]) -> bool {
    if long_header_type(datagram) != Some(INITIAL) {
        return false;
    }
    match packet_len(datagram) {
        Some(len) => datagram
            .get(len..)
            .and_then(long_header_type)
            .is_none_or(|kind| kind != HANDSHAKE),
        None => true,
    }
}

/// The packet type of a QUIC version 1 long header at the start of `bytes`.
fn long_header_type(bytes: &[u8]) -> Option<u8> {
    let [first, version @ ..] = bytes else {
        return None;
    };
    // Header form 1 (long). The fixed bit is not checked: a peer may grease it (RFC 9287).
    if first & 0x80 == 0 || version.get(..4) != Some(&[0, 0, 0, 1]) {
        return None;
    }
    Some((first >> 4) & 0x03)
}

/// The length of the Initial packet at the start of `bytes` (its header and payload), from
/// its header's fields (RFC 9000, 17.2.2); `None` if the header is cut short.
fn packet_len(bytes: &[u8]) -> Option<usize> {
    let mut at = 5;
    for _ in 0..2 {
        // Destination, then source connection ID: a length byte and the ID.
        let len = usize::from(*bytes.get(at)?);
        at = at.checked_add(1 + len)?;
    }
    let (token, n) = varint(bytes.get(at..)?)?;
    at = at
        .checked_add(n)?
        .checked_add(usize::try_from(token).ok()?)?;
    let (length, n) = varint(bytes.get(at..)?)?;
    let end = at
        .checked_add(n)?
        .checked_add(usize::try_from(length).ok()?)?;
    (end <= bytes.len()).then_some(end)
}

/// A QUIC variable-length integer (RFC 9000, 16) and the bytes it took.
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let first = *bytes.first()?;
    let len = 1usize << (first >> 6);
    let mut value = u64::from(first & 0x3f);
    for byte in bytes.get(1..len)? {
        value = (value << 8) | u64::from(*byte);
    }
    Some((value, len))
}

/// Newcomers' datagrams set aside, oldest first, with their receive metadata.
#[derive(Default)]
pub struct Held {
    queue: VecDeque<(RecvMeta, Box<[u8]>)>,
    bytes: usize,
}

impl Held {
    /// Sorts the first `n` datagrams quinn's buffers got from the kernel: newcomers are
    /// copied out and held, the others moved (in order) to the front. Returns how many are
    /// left in front for quinn.
    pub fn sort(&mut self, bufs: &mut [IoSliceMut<'_>], metas: &mut [RecvMeta], n: usize) -> usize {
        let mut kept = 0;
        let was = self.queue.len();
        for i in 0..n.min(bufs.len()).min(metas.len()) {
            let meta = metas[i];
            let len = meta.len.min(bufs[i].len());
            // With GRO a buffer holds several datagrams of one sender, `stride` apart: it is
            // sorted by its first.
            let first = if meta.stride == 0 {
                len
            } else {
                meta.stride.min(len)
            };
            if opens_connection(&bufs[i][..first]) {
                self.hold(meta, &bufs[i][..len]);
                continue;
            }
            if kept != i {
                let (to, from) = bufs.split_at_mut(i);
                to[kept][..len].copy_from_slice(&from[0][..len]);
                metas[kept] = meta;
            }
            kept += 1;
        }
        if self.queue.len() != was {
            gauge!(QUIC_INITIALS_HELD).set(self.queue.len() as f64);
        }
        kept
    }

    fn hold(&mut self, meta: RecvMeta, data: &[u8]) {
        while self.bytes + data.len() > MAX_HELD_BYTES {
            let Some((_, oldest)) = self.queue.pop_front() else {
                break;
            };
            self.bytes -= oldest.len();
            counter!(QUIC_INITIALS_DROPPED).increment(1);
        }
        self.bytes += data.len();
        self.queue.push_back((meta, data.into()));
    }

    /// Gives quinn held datagrams, newest first, as many as its buffers take; returns how
    /// many.
    pub fn serve(&mut self, bufs: &mut [IoSliceMut<'_>], metas: &mut [RecvMeta]) -> usize {
        let mut n = 0;
        while n < bufs.len().min(metas.len()) {
            let Some((meta, data)) = self.queue.pop_back() else {
                break;
            };
            self.bytes -= data.len();
            // Each came from a buffer of quinn's, all of one size: it fits.
            let Some(to) = bufs[n].get_mut(..data.len()) else {
                counter!(QUIC_INITIALS_DROPPED).increment(1);
                continue;
            };
            to.copy_from_slice(&data);
            metas[n] = RecvMeta {
                len: data.len(),
                ..meta
            };
            n += 1;
        }
        if n > 0 {
            gauge!(QUIC_INITIALS_HELD).set(self.queue.len() as f64);
        }
        n
    }

    /// Datagrams held.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// The socket quinn's endpoint reads through: `inner` (quinn's own socket for the runtime),
/// with newcomers held apart ([module docs](self)).
pub struct Intake {
    inner: Arc<dyn AsyncUdpSocket>,
    held: Mutex<Held>,
}

impl Intake {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>) -> Intake {
        Intake {
            inner,
            held: Mutex::default(),
        }
    }
}

impl fmt::Debug for Intake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Intake")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for Intake {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // Only quinn's endpoint driver reads: the lock is never contended.
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let mut drained = false;
        for _ in 0..READS_BEFORE_NEWCOMERS {
            match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => {
                    let kept = held.sort(bufs, meta, n);
                    if kept > 0 {
                        return Poll::Ready(Ok(kept));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // The kernel's queue is empty and the socket's waker is registered.
                    drained = true;
                    break;
                }
            }
        }
        let served = held.serve(bufs, meta);
        if served > 0 {
            return Poll::Ready(Ok(served));
        }
        if !drained {
            // Reads found only newcomers, all dropped: read on at the next poll.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests;
