//! intake: where a QUIC device's datagrams enter the proxy — the UDP socket under quinn's
//! endpoint, read before quinn sees them — with newcomers queued apart from the connections
//! the proxy already knows, as TCP has them apart in the kernel (a SYN and accept queue of
//! their own, each established socket's data in its own buffer).
//!
//! A UDP socket has one kernel queue, served in arrival order. In a reconnect storm thousands
//! of Initials (1,200 bytes each, padded) arrive in the same second and queue ahead of the
//! last flight of the handshakes already admitted, and ahead of the DATA of the devices
//! already back. An admitted handshake then holds its slot of `--max-handshakes` until its
//! device's Finished has waited through that queue, so the slots finish fewer handshakes a
//! second, and the devices behind them wait in line or are refused.
//!
//! [`Intake`] reads the kernel's queue ahead of quinn and sorts ([`newcomer`]). The
//! endpoint's connection IDs are keyed ([`Ids`], quinn's hashed generator under a key of this
//! process), so a datagram whose destination ID is one of ours ([`known`]) belongs to a
//! connection the proxy made: a handshake's last flight (an Initial acknowledgement
//! coalesced with the Finished), an established session's traffic. It goes to quinn at once,
//! in order. Set aside, as newcomers, are datagrams of at least [`MIN_INITIAL`] bytes that
//! either carry an ID not ours (a ClientHello, its retransmission, junk) or are a ClientHello
//! under one of ours (sent again after a Retry: [`opens_connection`], an Initial with no
//! Handshake packet behind it). Shorter ones go to quinn at once, as before: a client's
//! Initial is never shorter (RFC 9000, 14.1), and quinn drops them or answers with a
//! stateless reset. Measured, the ClientHellos after a Retry must wait with
//! the others: let through at once, the storm was as slow as without the intake
//! (docs/performance.md): newcomers reach quinn at the pace it has room for, not the
//! storm's.
//!
//! The set-aside datagrams go to quinn when the kernel has nothing else, after
//! [`READS_BEFORE_NEWCOMERS`] reads that found only newcomers, or after
//! [`KNOWN_BEFORE_NEWCOMERS`] turns of known traffic in a row (so a steady stream of it does
//! not shut new devices out), **newest first**: under a backlog the oldest have waited past
//! their device's probe timeout and been sent again, and serving the fresh copy first keeps
//! the time a served device waited short (the adaptive-LIFO of overloaded RPC servers). One
//! held longer than the handshake timeout is dropped: its device has given up or sent it
//! again. At most [`MAX_HELD_BYTES`] are held, each datagram charged its bytes and
//! [`ENTRY_COST`]; past it the oldest are dropped. Drops are counted
//! (`wasmbed_proxy_quic_initials_dropped_total`): their devices send again, as after a drop
//! in the kernel.
//!
//! What a peer can do with it: datagrams with IDs not ours only ever wait behind the
//! traffic of known connections, in bounded memory, and get a turn every
//! [`KNOWN_BEFORE_NEWCOMERS`] batches. To skip the queue a datagram needs an ID the proxy
//! issued. The tag is quinn's (a 40-bit keyed FxHash), made to route, not to resist a peer:
//! one that has seen an ID of ours (from a connection or a Retry at its own address) can
//! compute others, and a ClientHello under one with a Handshake header appended skips the
//! queue too. What that buys is priority for its own datagrams over other newcomers, never
//! memory (the bound is on what waits) nor the known traffic's place; quinn then treats the
//! datagram as it would without the intake.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, ConnectionId, ConnectionIdGenerator, UdpPoller};
use quinn_proto::HashedConnectionIdGenerator;

use crate::metric_names::{QUIC_INITIALS_DROPPED, QUIC_INITIALS_HELD};

/// Bytes of newcomers' datagrams held at most, [`ENTRY_COST`] each included (about 6,000
/// Initials): past it the oldest are dropped.
pub const MAX_HELD_BYTES: usize = 8 << 20;

/// What a held datagram costs beyond its bytes (its queue slot and its allocation's header),
/// charged to the bound.
pub const ENTRY_COST: usize = 128;

/// The shortest datagram held: a client's datagram carrying an Initial is padded to at
/// least this (RFC 9000, 14.1).
pub const MIN_INITIAL: usize = 1200;

/// Reads from the kernel in one poll that may find only newcomers before held ones are
/// served: the kernel's queue is searched ahead for known traffic, four batches (quinn's:
/// 32 datagrams each) a poll, while newcomers are served a batch at a time.
pub const READS_BEFORE_NEWCOMERS: usize = 4;

/// Batches of known traffic given to quinn in a row, while newcomers wait, before a batch of
/// newcomers goes: known traffic comes first, not only.
pub const KNOWN_BEFORE_NEWCOMERS: u32 = 64;

/// The endpoint's connection IDs: quinn's hashed generator under a key of this process, so
/// that an ID can be told ours (quinn checks its IDs the same way).
#[derive(Clone, Copy)]
pub struct Ids {
    key: u64,
}

impl Ids {
    /// Under a fresh random key.
    pub fn random() -> io::Result<Ids> {
        let mut key = [0u8; 8];
        rustls::crypto::aws_lc_rs::default_provider()
            .secure_random
            .fill(&mut key)
            .map_err(|_| io::Error::other("no randomness for the QUIC connection IDs' key"))?;
        Ok(Ids::from_key(u64::from_le_bytes(key)))
    }

    /// Under `key` (tests).
    pub fn from_key(key: u64) -> Ids {
        Ids { key }
    }

    /// The generator the endpoint issues IDs with.
    pub fn generator(&self) -> HashedConnectionIdGenerator {
        HashedConnectionIdGenerator::from_key(self.key)
    }

    /// The endpoint's config, issuing these IDs, and QUIC version 1 only (devices speak it;
    /// the drafts quinn also accepts by default would be sorted blind: [`opens_connection`]
    /// reads version 1 headers).
    pub fn endpoint_config(self) -> quinn::EndpointConfig {
        let mut config = quinn::EndpointConfig::default();
        config.cid_generator(move || Box::new(self.generator()));
        config.supported_versions(vec![1]);
        config
    }
}

/// Whether `datagram` belongs to a connection this endpoint made: its destination
/// connection ID, read from its first packet's header (long or short), is one `ids` issued.
pub fn known(datagram: &[u8], ids: &HashedConnectionIdGenerator) -> bool {
    let len = ids.cid_len();
    let dcid = match datagram.first() {
        // A long header: the version (4 bytes), then the ID's length and the ID.
        Some(first) if first & 0x80 != 0 => datagram
            .get(5)
            .filter(|l| usize::from(**l) == len)
            .and_then(|_| datagram.get(6..6 + len)),
        // A short header: the ID right after the first byte, of the length we issue.
        Some(_) => datagram.get(1..1 + len),
        None => None,
    };
    dcid.is_some_and(|id| ids.validate(&ConnectionId::new(id)).is_ok())
}

/// Whether `datagram` waits with the newcomers: at least [`MIN_INITIAL`] bytes, and either
/// not [`known`], or a ClientHello under one of our IDs (sent again after a Retry: an Initial
/// with no Handshake packet behind it). A handshake's last flight is an Initial (an
/// acknowledgement) coalesced with a Handshake packet (the Finished): not a newcomer.
pub fn newcomer(datagram: &[u8], ids: &HashedConnectionIdGenerator) -> bool {
    datagram.len() >= MIN_INITIAL && (!known(datagram, ids) || opens_connection(datagram))
}

/// A QUIC version 1 long-header packet's type, in the first byte's bits 4–5.
const INITIAL: u8 = 0;
const HANDSHAKE: u8 = 2;

/// Whether `datagram`'s first packet is a QUIC v1 Initial with no Handshake packet behind
/// it: a ClientHello (or an Initial acknowledgement sent alone). Anything unparsable after
/// an Initial's first byte and version counts as one: the newcomers' queue is the safe side
/// for bytes quinn will drop.
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

/// Newcomers' datagrams set aside, oldest first, with their receive metadata and arrival.
pub struct Held {
    ids: HashedConnectionIdGenerator,
    max_age: Duration,
    queue: VecDeque<(RecvMeta, Box<[u8]>, Instant)>,
    bytes: usize,
    /// Batches of known traffic given to quinn in a row while newcomers waited.
    streak: u32,
}

impl Held {
    /// None held; datagrams are told apart by `ids`, and dropped once held `max_age`.
    pub fn new(ids: Ids, max_age: Duration) -> Held {
        Held {
            ids: ids.generator(),
            max_age,
            queue: VecDeque::new(),
            bytes: 0,
            streak: 0,
        }
    }

    /// Sorts the first `n` datagrams quinn's buffers got from the kernel at `now`: newcomers
    /// are copied out and held, the others moved (in order) to the front. Returns how many
    /// are left in front for quinn.
    pub fn sort(
        &mut self,
        bufs: &mut [IoSliceMut<'_>],
        metas: &mut [RecvMeta],
        n: usize,
        now: Instant,
    ) -> usize {
        let mut kept = 0;
        let was = self.queue.len();
        for i in 0..n.min(bufs.len()).min(metas.len()) {
            let meta = metas[i];
            let len = meta.len.min(bufs[i].len());
            // With GRO a buffer holds several datagrams of one sender, `stride` apart: it is
            // sorted by its first (a sender's datagrams in one batch are of one connection).
            let first = if meta.stride == 0 {
                len
            } else {
                meta.stride.min(len)
            };
            if newcomer(&bufs[i][..first], &self.ids) {
                self.hold(meta, &bufs[i][..len], now);
                continue;
            }
            if kept != i {
                let (to, from) = bufs.split_at_mut(i);
                let (Some(to), Some(from)) = (to[kept].get_mut(..len), from[0].get(..len)) else {
                    counter!(QUIC_INITIALS_DROPPED).increment(1);
                    continue;
                };
                to.copy_from_slice(from);
                metas[kept] = RecvMeta { len, ..meta };
            }
            kept += 1;
        }
        if self.queue.len() != was {
            gauge!(QUIC_INITIALS_HELD).set(self.queue.len() as f64);
        }
        kept
    }

    fn hold(&mut self, meta: RecvMeta, data: &[u8], now: Instant) {
        let cost = data.len() + ENTRY_COST;
        while self.bytes + cost > MAX_HELD_BYTES {
            if !self.drop_oldest() {
                break;
            }
        }
        self.bytes += cost;
        self.queue.push_back((meta, data.into(), now));
    }

    fn drop_oldest(&mut self) -> bool {
        let Some((_, oldest, _)) = self.queue.pop_front() else {
            return false;
        };
        self.bytes -= oldest.len() + ENTRY_COST;
        counter!(QUIC_INITIALS_DROPPED).increment(1);
        true
    }

    /// Gives quinn held datagrams at `now`, newest first, as many as its buffers take, after
    /// dropping those held past `max_age`; returns how many.
    pub fn serve(
        &mut self,
        bufs: &mut [IoSliceMut<'_>],
        metas: &mut [RecvMeta],
        now: Instant,
    ) -> usize {
        let was = self.queue.len();
        while self
            .queue
            .front()
            .is_some_and(|(_, _, at)| now.saturating_duration_since(*at) > self.max_age)
        {
            self.drop_oldest();
        }
        let mut n = 0;
        while n < bufs.len().min(metas.len()) {
            let Some((meta, data, at)) = self.queue.pop_back() else {
                break;
            };
            self.bytes -= data.len() + ENTRY_COST;
            // Each came from a buffer of quinn's, all of one size: it fits.
            let Some(to) = bufs[n].get_mut(..data.len()) else {
                // Not this buffer's size: kept for the next serve (the bytes counted back).
                self.bytes += data.len() + ENTRY_COST;
                self.queue.push_back((meta, data, at));
                break;
            };
            to.copy_from_slice(&data);
            metas[n] = RecvMeta {
                len: data.len(),
                ..meta
            };
            n += 1;
        }
        if self.queue.is_empty() && self.queue.capacity() > 1024 {
            // A storm's queue is not kept once it is over.
            self.queue = VecDeque::new();
        }
        if self.queue.len() != was {
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

    /// Bytes charged to the bound.
    pub fn charged(&self) -> usize {
        self.bytes
    }
}

/// The socket quinn's endpoint reads through: `inner` (quinn's own socket for the runtime),
/// with newcomers held apart ([module docs](self)).
pub struct Intake {
    inner: Arc<dyn AsyncUdpSocket>,
    held: Mutex<Held>,
}

impl Intake {
    /// Reads `inner` for quinn, telling datagrams apart by `ids` (the IDs the endpoint
    /// issues: [`Ids::endpoint_config`]) and dropping newcomers held past `max_age`.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, ids: Ids, max_age: Duration) -> Intake {
        Intake {
            inner,
            held: Mutex::new(Held::new(ids, max_age)),
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
        if held.streak >= KNOWN_BEFORE_NEWCOMERS {
            held.streak = 0;
            let served = held.serve(bufs, meta, Instant::now());
            if served > 0 {
                return Poll::Ready(Ok(served));
            }
        }
        let mut drained = false;
        for _ in 0..READS_BEFORE_NEWCOMERS {
            match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => {
                    let kept = held.sort(bufs, meta, n, Instant::now());
                    if kept > 0 {
                        if !held.is_empty() {
                            held.streak += 1;
                        }
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
        held.streak = 0;
        let served = held.serve(bufs, meta, Instant::now());
        if served > 0 {
            return Poll::Ready(Ok(served));
        }
        if !drained {
            // Reads found only newcomers, none left to serve: read on at the next poll.
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

/// A QUIC server endpoint on `socket` with `server`, its datagrams read through an
/// [`Intake`] (newcomers held at most `max_age`).
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: quinn::ServerConfig,
    max_age: Duration,
) -> io::Result<quinn::Endpoint> {
    endpoint_with(socket, server, Ids::random()?, max_age)
}

/// [`endpoint`] with the IDs given (tests).
pub fn endpoint_with(
    socket: std::net::UdpSocket,
    server: quinn::ServerConfig,
    ids: Ids,
    max_age: Duration,
) -> io::Result<quinn::Endpoint> {
    let runtime = wasmbed_certs::udp::runtime()?;
    let socket = runtime.wrap_udp_socket(socket)?;
    quinn::Endpoint::new_with_abstract_socket(
        ids.endpoint_config(),
        Some(server),
        Arc::new(Intake::new(socket, ids, max_age)),
        runtime,
    )
}

#[cfg(test)]
mod tests;
