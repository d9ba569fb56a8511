use std::io::IoSliceMut;
use std::net::SocketAddr;

use proptest::prelude::*;
use quinn::udp::RecvMeta;

use super::*;

/// A QUIC v1 long-header packet: `first` (type bits included), the IDs, an Initial's token
/// field (empty) when it is one, the Length field and `payload` bytes of zeros.
fn long(first: u8, payload: usize) -> Vec<u8> {
    let mut p = vec![first, 0, 0, 0, 1];
    p.push(8);
    p.extend_from_slice(&[0xd1; 8]);
    p.push(8);
    p.extend_from_slice(&[0x5c; 8]);
    if (first >> 4) & 0x03 == INITIAL {
        p.push(0); // no token
    }
    let len = u16::try_from(payload).unwrap();
    p.extend_from_slice(&(0x4000 | len).to_be_bytes());
    p.resize(p.len() + payload, 0);
    p
}

fn initial(payload: usize) -> Vec<u8> {
    long(0xc3, payload)
}

fn handshake(payload: usize) -> Vec<u8> {
    long(0xe3, payload)
}

/// A short-header (1-RTT) packet.
fn short(len: usize) -> Vec<u8> {
    let mut p = vec![0x43];
    p.resize(len, 0x77);
    p
}

#[test]
fn a_first_initial_opens_a_connection_padded_or_not() {
    assert!(opens_connection(&initial(1150)));
    // Padding after the packet (zeros: no packet header) is not a second packet.
    let mut padded = initial(300);
    padded.resize(1200, 0);
    assert!(opens_connection(&padded));
}

#[test]
fn an_initial_with_a_handshake_packet_behind_it_continues_one() {
    // A client's last flight: an Initial acknowledging the server's, then its Finished.
    let mut flight = initial(40);
    flight.extend(handshake(100));
    flight.resize(1200, 0);
    assert!(!opens_connection(&flight));
    // An Initial behind an Initial (not a Handshake): still a newcomer.
    let mut two = initial(40);
    two.extend(initial(40));
    assert!(opens_connection(&two));
}

#[test]
fn traffic_of_connections_under_way_is_not_held() {
    assert!(!opens_connection(&short(60)));
    assert!(!opens_connection(&handshake(200)));
    assert!(!opens_connection(&long(0xd3, 200)), "0-RTT");
    assert!(!opens_connection(&[]));
    // Another version (here QUIC v2's) or version negotiation: quinn answers or drops it.
    let mut v2 = initial(100);
    v2[1..5].copy_from_slice(&[0x6b, 0x33, 0x43, 0xcf]);
    assert!(!opens_connection(&v2));
    let mut negotiation = initial(100);
    negotiation[1..5].copy_from_slice(&[0, 0, 0, 0]);
    assert!(!opens_connection(&negotiation));
}

#[test]
fn an_initial_cut_short_is_a_newcomer() {
    let whole = initial(100);
    for cut in 5..whole.len() {
        assert!(opens_connection(&whole[..cut]), "cut at {cut}");
    }
    // A Length past the datagram's end, a token length near u64::MAX.
    let mut huge = initial(100);
    huge[23] = 0xff;
    assert!(opens_connection(&huge));
    let mut token = initial(100);
    token[22] = 0xff;
    assert!(opens_connection(&token));
}

proptest! {
    #[test]
    fn any_bytes_are_sorted_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
        let _ = opens_connection(&bytes);
    }
}

/// `datagrams` as quinn's buffers hold them after a read (each buffer 1,500 bytes).
struct Read {
    storage: Vec<Vec<u8>>,
    metas: Vec<RecvMeta>,
}

impl Read {
    fn of(datagrams: &[Vec<u8>], slots: usize) -> Read {
        let mut storage = vec![vec![0u8; 1500]; slots];
        let mut metas = vec![RecvMeta::default(); slots];
        for (i, d) in datagrams.iter().enumerate() {
            storage[i][..d.len()].copy_from_slice(d);
            metas[i].len = d.len();
            metas[i].stride = d.len();
            metas[i].addr = SocketAddr::from(([127, 0, 0, 1], 4000 + i as u16));
        }
        Read { storage, metas }
    }

    /// Runs `f` with the buffers as quinn passes them.
    fn with<T>(&mut self, f: impl FnOnce(&mut [IoSliceMut<'_>], &mut [RecvMeta]) -> T) -> T {
        let mut bufs: Vec<IoSliceMut<'_>> = self
            .storage
            .iter_mut()
            .map(|b| IoSliceMut::new(b))
            .collect();
        f(&mut bufs, &mut self.metas)
    }

    /// The first `n` datagrams, with their sources' ports.
    fn front(&self, n: usize) -> Vec<(u16, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let m = &self.metas[i];
                (m.addr.port(), self.storage[i][..m.len].to_vec())
            })
            .collect()
    }
}

#[test]
fn newcomers_wait_behind_the_rest_and_are_served_newest_first() {
    let (a, b) = (initial(1150), initial(1160));
    let x = short(80);
    let mut y = initial(40);
    y.extend(handshake(100));
    let mut read = Read::of(&[a.clone(), x.clone(), b.clone(), y.clone()], 4);
    let mut held = Held::default();
    let kept = read.with(|bufs, metas| held.sort(bufs, metas, 4));
    assert_eq!(kept, 2);
    assert_eq!(
        read.front(2),
        vec![(4001, x), (4003, y)],
        "in order, in front"
    );
    assert_eq!(held.len(), 2);

    let mut out = Read::of(&[], 4);
    let served = out.with(|bufs, metas| held.serve(bufs, metas));
    assert_eq!(served, 2);
    assert_eq!(out.front(2), vec![(4002, b), (4000, a)], "newest first");
    assert!(held.is_empty());
    assert_eq!(out.with(|bufs, metas| held.serve(bufs, metas)), 0);
}

#[test]
fn served_only_as_many_as_quinns_buffers_take() {
    let mut held = Held::default();
    let all: Vec<Vec<u8>> = (0..5).map(|i| initial(1000 + i)).collect();
    let mut read = Read::of(&all, 5);
    assert_eq!(read.with(|bufs, metas| held.sort(bufs, metas, 5)), 0);
    let mut out = Read::of(&[], 2);
    assert_eq!(out.with(|bufs, metas| held.serve(bufs, metas)), 2);
    assert_eq!(out.front(2)[0].1, all[4]);
    assert_eq!(out.front(2)[1].1, all[3]);
    assert_eq!(held.len(), 3);
}

#[test]
fn past_the_bound_the_oldest_newcomers_are_dropped() {
    let mut held = Held::default();
    let each = initial(1150);
    let fit = MAX_HELD_BYTES / each.len();
    for _ in 0..fit + 10 {
        let mut read = Read::of(std::slice::from_ref(&each), 1);
        read.with(|bufs, metas| held.sort(bufs, metas, 1));
    }
    assert_eq!(held.len(), fit, "bounded");
    assert!(held.bytes <= MAX_HELD_BYTES);
}
