use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use quinn::udp::RecvMeta;

use super::*;

const KEY: u64 = 0x0005_eed0_f1d5;

fn ids() -> HashedConnectionIdGenerator {
    Ids::from_key(KEY).generator()
}

/// An ID the endpoint issued.
fn ours() -> Vec<u8> {
    ids().generate_cid().to_vec()
}

/// A QUIC v1 long-header packet: `first` (type bits included), destination ID `dcid`, an
/// 8-byte source ID, an empty token when it is an Initial, its Length field and `payload`
/// bytes of zeros.
fn packet(first: u8, dcid: &[u8], payload: usize) -> Vec<u8> {
    let mut p = vec![first, 0, 0, 0, 1, u8::try_from(dcid.len()).unwrap()];
    p.extend_from_slice(dcid);
    p.push(8);
    p.extend_from_slice(&[0x5c; 8]);
    if (first >> 4) & 0x03 == 0 {
        p.push(0);
    }
    p.extend_from_slice(&(0x4000 | u16::try_from(payload).unwrap()).to_be_bytes());
    p.resize(p.len() + payload, 0);
    p
}

/// `p` padded with zeros to `len` bytes (as a client pads a datagram with an Initial).
fn padded(mut p: Vec<u8>, len: usize) -> Vec<u8> {
    p.resize(len.max(p.len()), 0);
    p
}

/// A long-header packet padded to `len` (no Length field worth reading: tests of IDs).
fn long(first: u8, dcid: &[u8], len: usize) -> Vec<u8> {
    padded(packet(first, dcid, 0), len)
}

/// A handshake's last flight from a device: an Initial acknowledgement to `dcid`
/// coalesced with its Handshake packet (the Finished), padded.
fn last_flight(dcid: &[u8]) -> Vec<u8> {
    let mut flight = packet(0xc3, dcid, 40);
    flight.extend(packet(0xe3, dcid, 100));
    padded(flight, MIN_INITIAL)
}

/// A device's first Initial (its own random destination ID), padded as clients must.
fn first_initial(seed: u8) -> Vec<u8> {
    padded(packet(0xc3, &[seed; 16], 1100), MIN_INITIAL)
}

/// A short-header (1-RTT) packet to `dcid`.
fn short(dcid: &[u8], len: usize) -> Vec<u8> {
    let mut p = vec![0x43];
    p.extend_from_slice(dcid);
    p.resize(len, 0x77);
    p
}

#[test]
fn traffic_of_connections_the_endpoint_made_is_not_held() {
    let ids = ids();
    let id = ours();
    assert!(known(&short(&id, 60), &ids), "1-RTT");
    assert!(!newcomer(&short(&id, MIN_INITIAL), &ids), "1-RTT, large");
    assert!(
        !newcomer(&long(0xe3, &id, MIN_INITIAL), &ids),
        "a Handshake packet"
    );
    assert!(
        !newcomer(&last_flight(&id), &ids),
        "a handshake's last flight"
    );
}

#[test]
fn a_first_flight_and_ids_not_ours_wait_with_the_newcomers() {
    let ids = ids();
    assert!(newcomer(&first_initial(1), &ids));
    // A ClientHello again under our ID (after a Retry): a newcomer still.
    assert!(newcomer(
        &padded(packet(0xc3, &ours(), 1100), MIN_INITIAL),
        &ids
    ));
    // An 8-byte ID that is not ours (the wrong tag), long or short header: a last flight
    // with a forged ID gains nothing.
    let mut forged = ours();
    forged[7] ^= 1;
    assert!(newcomer(&last_flight(&forged), &ids));
    assert!(newcomer(&short(&forged, MIN_INITIAL), &ids));
    // Another endpoint's IDs (another key).
    let theirs = Ids::from_key(KEY + 1).generator().generate_cid().to_vec();
    assert!(newcomer(&short(&theirs, 1300), &ids));
}

#[test]
fn short_datagrams_not_ours_go_to_quinn_at_once() {
    let ids = ids();
    // Shorter than any client Initial: quinn drops or answers them, as before.
    assert!(!newcomer(&long(0xc3, &[9; 16], MIN_INITIAL - 1), &ids));
    assert!(!newcomer(&short(&[9; 8], 100), &ids));
    assert!(!newcomer(&[], &ids));
    assert!(!known(&[], &ids));
    assert!(!known(&[0xc3, 0, 0, 0, 1], &ids), "cut before the ID");
    // Our ID under a length byte that is not our length is not read as ours.
    let mut p = long(0xe3, &ours(), MIN_INITIAL);
    p[5] = 9;
    assert!(!known(&p, &ids));
}

#[test]
fn a_last_flight_whose_initial_cannot_be_read_through_is_a_newcomer() {
    let ids = ids();
    let id = ours();
    // The Initial's header: first byte, version, ID length and ID (8), source ID (1 + 8),
    // token length (1), then its Length field (2).
    let length_at = 1 + 4 + 1 + 8 + 1 + 8 + 1;
    let flight = last_flight(&id);
    assert!(!newcomer(&flight, &ids));
    // A Length past the datagram's end.
    let mut long_length = flight.clone();
    long_length[length_at..length_at + 2].copy_from_slice(&0x7fffu16.to_be_bytes());
    assert!(newcomer(&long_length, &ids));
    // A Length that ends inside the Handshake packet: no Handshake header found there.
    let mut off = flight.clone();
    off[length_at..length_at + 2].copy_from_slice(&(0x4000u16 | 45).to_be_bytes());
    assert!(newcomer(&off, &ids));
    // A token length near the end of what a varint holds.
    let mut token = flight.clone();
    token[length_at - 1] = 0xff;
    assert!(newcomer(&token, &ids));
    // Cut anywhere inside the Initial's header.
    for cut in 6..length_at + 2 {
        assert!(
            newcomer(&padded(flight[..cut].to_vec(), MIN_INITIAL), &ids),
            "cut at {cut}"
        );
    }
}

proptest! {
    #[test]
    fn any_bytes_are_sorted_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
        let ids = ids();
        let _ = newcomer(&bytes, &ids);
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

fn held() -> Held {
    Held::new(Ids::from_key(KEY), Duration::from_secs(5))
}

#[test]
fn newcomers_wait_behind_the_rest_and_are_served_newest_first() {
    let now = Instant::now();
    let (a, b) = (first_initial(1), first_initial(2));
    let x = short(&ours(), 80);
    let y = last_flight(&ours());
    let mut read = Read::of(&[a.clone(), x.clone(), b.clone(), y.clone()], 4);
    let mut held = held();
    let kept = read.with(|bufs, metas| held.sort(bufs, metas, 4, now));
    assert_eq!(kept, 2);
    assert_eq!(
        read.front(2),
        vec![(4001, x), (4003, y)],
        "in order, in front"
    );
    assert_eq!(held.len(), 2);

    let mut out = Read::of(&[], 4);
    let served = out.with(|bufs, metas| held.serve(bufs, metas, now));
    assert_eq!(served, 2);
    assert_eq!(out.front(2), vec![(4002, b), (4000, a)], "newest first");
    assert!(held.is_empty());
    assert_eq!(held.charged(), 0);
    assert_eq!(out.with(|bufs, metas| held.serve(bufs, metas, now)), 0);
}

#[test]
fn served_only_as_many_as_quinns_buffers_take() {
    let now = Instant::now();
    let mut held = held();
    let all: Vec<Vec<u8>> = (0..5).map(first_initial).collect();
    let mut read = Read::of(&all, 5);
    assert_eq!(read.with(|bufs, metas| held.sort(bufs, metas, 5, now)), 0);
    let mut out = Read::of(&[], 2);
    assert_eq!(out.with(|bufs, metas| held.serve(bufs, metas, now)), 2);
    assert_eq!(out.front(2)[0].1, all[4]);
    assert_eq!(out.front(2)[1].1, all[3]);
    assert_eq!(held.len(), 3);
}

#[test]
fn past_the_bound_the_oldest_newcomers_are_dropped() {
    let now = Instant::now();
    let mut held = held();
    let fit = MAX_HELD_BYTES / (MIN_INITIAL + ENTRY_COST);
    let total = fit + 10;
    // Each datagram numbered in its last two bytes.
    for i in 0..total {
        let mut d = first_initial(7);
        let n = u16::try_from(i).unwrap().to_be_bytes();
        d[MIN_INITIAL - 2..].copy_from_slice(&n);
        let mut read = Read::of(std::slice::from_ref(&d), 1);
        read.with(|bufs, metas| held.sort(bufs, metas, 1, now));
    }
    assert_eq!(
        held.len(),
        fit,
        "bounded, each charged its bytes and its entry"
    );
    assert!(held.charged() <= MAX_HELD_BYTES);
    // What is left is the newest `fit`: served newest first, down to number `total - fit`.
    let mut numbers = Vec::new();
    loop {
        let mut out = Read::of(&[], 4);
        let n = out.with(|bufs, metas| held.serve(bufs, metas, now));
        if n == 0 {
            break;
        }
        for (_, d) in out.front(n) {
            numbers.push(usize::from(u16::from_be_bytes([
                d[MIN_INITIAL - 2],
                d[MIN_INITIAL - 1],
            ])));
        }
    }
    let expected: Vec<usize> = (total - fit..total).rev().collect();
    assert_eq!(numbers, expected, "the oldest were dropped");
}

#[test]
fn newcomers_held_past_the_age_are_dropped() {
    let then = Instant::now();
    let mut held = held();
    let mut read = Read::of(&[first_initial(1), first_initial(2)], 2);
    read.with(|bufs, metas| held.sort(bufs, metas, 2, then));
    let mut late = Read::of(&[first_initial(3)], 1);
    let later = then + Duration::from_secs(4);
    late.with(|bufs, metas| held.sort(bufs, metas, 1, later));
    let mut out = Read::of(&[], 4);
    let served = out.with(|bufs, metas| held.serve(bufs, metas, then + Duration::from_secs(6)));
    assert_eq!(
        served, 1,
        "the two held 6 s are dropped, the one held 2 s is served"
    );
    assert_eq!(out.front(1)[0].1, first_initial(3));
    assert_eq!(held.charged(), 0);
}

/// A socket that answers each read from a script: a batch of datagrams, or "nothing now".
#[derive(Debug, Default)]
struct Scripted {
    reads: Mutex<VecDeque<Option<Vec<Vec<u8>>>>>,
}

impl AsyncUdpSocket for Scripted {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        unreachable!("the intake's reads only")
    }
    fn try_send(&self, _: &Transmit<'_>) -> io::Result<()> {
        Ok(())
    }
    fn poll_recv(
        &self,
        _: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        match self.reads.lock().unwrap().pop_front() {
            Some(Some(batch)) => {
                for (i, d) in batch.iter().enumerate() {
                    bufs[i][..d.len()].copy_from_slice(d);
                    meta[i] = RecvMeta {
                        len: d.len(),
                        stride: d.len(),
                        addr: SocketAddr::from(([127, 0, 0, 1], 5000)),
                        ..RecvMeta::default()
                    };
                }
                Poll::Ready(Ok(batch.len()))
            }
            _ => Poll::Pending,
        }
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(SocketAddr::from(([127, 0, 0, 1], 4433)))
    }
}

/// Polls `intake` once with four buffers: what quinn got.
fn poll(intake: &Intake) -> Option<Vec<Vec<u8>>> {
    let mut read = Read::of(&[], 4);
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let got = read.with(|bufs, metas| intake.poll_recv(&mut cx, bufs, metas));
    match got {
        Poll::Ready(Ok(n)) => Some(read.front(n).into_iter().map(|(_, d)| d).collect()),
        Poll::Ready(Err(e)) => panic!("{e}"),
        Poll::Pending => None,
    }
}

#[test]
fn the_intake_gives_quinn_known_traffic_first_and_newcomers_in_turn() {
    let script = Arc::new(Scripted::default());
    let intake = Intake::new(script.clone(), Ids::from_key(KEY), Duration::from_secs(5));
    let id = ours();
    let known_one = || short(&id, 100);
    {
        let mut reads = script.reads.lock().unwrap();
        // A read of newcomers only, then one with a known datagram behind a newcomer.
        reads.push_back(Some(vec![first_initial(1), first_initial(2)]));
        reads.push_back(Some(vec![first_initial(3), known_one()]));
        // Then the kernel has nothing.
        reads.push_back(None);
    }
    assert_eq!(
        poll(&intake),
        Some(vec![known_one()]),
        "the known one first"
    );
    assert_eq!(
        poll(&intake),
        Some(vec![first_initial(3), first_initial(2), first_initial(1)]),
        "then the newcomers, newest first, once the kernel has nothing"
    );
    assert_eq!(poll(&intake), None);

    // A steady stream of known traffic: newcomers still get a turn.
    {
        let mut reads = script.reads.lock().unwrap();
        reads.push_back(Some(vec![first_initial(9)]));
        for _ in 0..KNOWN_BEFORE_NEWCOMERS + 10 {
            reads.push_back(Some(vec![known_one()]));
        }
    }
    let mut turns = 0;
    let got = loop {
        turns += 1;
        let got = poll(&intake).expect("traffic");
        if got != vec![known_one()] {
            break got;
        }
    };
    assert_eq!(got, vec![first_initial(9)]);
    assert_eq!(
        turns,
        usize::try_from(KNOWN_BEFORE_NEWCOMERS).unwrap() + 1,
        "after its turns of known traffic"
    );
}

/// A real device (quinn, TLS 1.3) and an endpoint through the intake, the device's datagrams
/// relayed and sorted as the intake sorts them: its ClientHello (one Initial, or two with a
/// post-quantum key share) waits with the newcomers; its last flight (an Initial
/// acknowledgement coalesced with its Finished) and everything after do not.
#[tokio::test]
async fn only_a_devices_first_flight_waits_with_the_newcomers() {
    use wasmbed_certs::pki::{DevCa, KeyKind};
    let ca = DevCa::generate("test CA").unwrap();
    let issued = ca.issue_server(&["localhost"], KeyKind::EcdsaP256).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(wasmbed_certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(issued.chain(), issued.key().unwrap())
        .unwrap();
    tls.alpn_protocols = vec![b"t".to_vec()];
    let server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).unwrap(),
    ));
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let endpoint =
        endpoint_with(socket, server, Ids::from_key(KEY), Duration::from_secs(5)).unwrap();
    let upstream = endpoint.local_addr().unwrap();
    let serving = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let mut buf = [0u8; 5];
        recv.read_exact(&mut buf).await.unwrap();
        send.write_all(&buf).await.unwrap();
        send.finish().unwrap();
        conn.closed().await;
    });

    let relay = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let relay_addr = relay.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::<bool>::new()));
    let relaying = {
        let (relay, seen) = (relay.clone(), seen.clone());
        tokio::spawn(async move {
            let ids = ids();
            let mut device = None;
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, from) = relay.recv_from(&mut buf).await.unwrap();
                let to = if from == upstream {
                    match device {
                        Some(d) => d,
                        None => continue,
                    }
                } else {
                    device = Some(from);
                    seen.lock().unwrap().push(newcomer(&buf[..n], &ids));
                    upstream
                };
                relay.send_to(&buf[..n], to).await.unwrap();
            }
        })
    };

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der()).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(wasmbed_certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"t".to_vec()];
    let client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(client)).unwrap(),
    ));
    let device = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = device
        .connect_with(client, relay_addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"hello").await.unwrap();
    send.finish().unwrap();
    assert_eq!(recv.read_to_end(64).await.unwrap(), b"hello");
    conn.close(0u32.into(), b"done");
    serving.await.unwrap();
    relaying.abort();

    let seen = seen.lock().unwrap().clone();
    let first = seen.iter().take_while(|n| **n).count();
    assert!((1..=2).contains(&first), "the ClientHello: {seen:?}");
    assert!(
        seen.len() > first + 2,
        "the handshake's end and the data: {seen:?}"
    );
    assert!(
        seen[first..].iter().all(|n| !n),
        "nothing after the ClientHello waits with the newcomers: {seen:?}"
    );
}
