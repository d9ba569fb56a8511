//! The fuzz targets' bodies: one function per parser or state machine that a peer, a file or
//! an operator feeds, each asserting what must hold whatever the bytes (no panic, and the
//! target's own invariants). `fuzz/harness` runs them under libFuzzer (`fuzz/run TARGET`);
//! this crate's tests replay every input kept in `fuzz/corpus/TARGET` and
//! `fuzz/regressions/TARGET`, so CI runs each corpus in seconds.
//!
//! Why libFuzzer through cargo-fuzz with `--sanitizer none`: it runs on stable Rust (the
//! coverage instrumentation is `-C passes=sancov-module`, a stable flag; only the sanitizers
//! need nightly), in process (hundreds of thousands of executions a second on the parsers,
//! where AFL++ forks or loops a whole process), and its inputs are plain files that a test
//! can replay. AddressSanitizer would add little: every target is safe Rust (the one
//! `unsafe` module, descriptor passing, parses no peer bytes).

mod tls_records;
pub use tls_records::tls_records;

use std::time::{Duration, SystemTime};

use arbitrary::{Result, Unstructured};

/// A target: bytes in; it panics when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target, by the name its corpus folder and harness binary carry.
pub const TARGETS: &[(&str, Target)] = &[
    ("client_hello", client_hello),
    ("frames", frames),
    ("proxy_v2", proxy_v2),
    ("ticket", ticket),
    ("proxy_config", proxy_config),
    ("gateway_config", gateway_config),
    ("anchor", anchor),
    ("anchor_peers", anchor_peers),
    ("device", device),
    ("device_peer", device_peer),
    ("quic_intake", quic_intake),
    ("handshake_joiner", handshake_joiner),
    ("tls_records", tls_records),
];

/// The proxy's ClientHello reader: any bytes give a hello, "more", "not TLS" or a refusal;
/// a hello never claims more bytes than it was given or than `max`.
pub fn client_hello(data: &[u8]) {
    use wasmbed_proxy::clienthello::{HelloError, parse};
    // The first two bytes pick the bound (the proxy's is configurable), the rest is input.
    let (max, input) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_be_bytes([*a, *b])).max(5), rest),
        _ => (16 * 1024, data),
    };
    match parse(input, max) {
        Ok(hello) => {
            assert!(hello.len <= input.len(), "a hello longer than its input");
            assert!(hello.len <= max, "a hello over max");
            if let Some(sni) = &hello.sni {
                assert_eq!(sni, &sni.to_ascii_lowercase(), "SNI not lowercased");
            }
            // The same records with more bytes after them read the same; one byte fewer is
            // not a hello yet (a reader that decides early would classify a half hello).
            let mut more = input[..hello.len].to_vec();
            more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
            assert_eq!(parse(&more, max).as_ref(), Ok(&hello));
            assert_eq!(
                parse(&input[..hello.len - 1], max),
                Err(HelloError::Incomplete)
            );
        }
        Err(HelloError::Incomplete) => assert!(input.len() < max, "incomplete past max"),
        Err(_) => {}
    }
}

/// The frame codec, both readers (in place, and the owned one and the tokio codec built on
/// it) and every control body (borrowed minicbor readers and owned serde types): the readers
/// agree frame by frame; a body both read says the same to both, and what the borrowed
/// writer writes the owned reader reads back equal.
pub fn frames(data: &[u8]) {
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;
    use wasmbed_protocol::{FrameCodec, decode, split};

    let max = 4096;
    let mut rest = data;
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::from(data);
    loop {
        let in_place = split(rest, max);
        let owned = decode(rest, max);
        let tokio = codec.decode(&mut buf);
        match (in_place, owned) {
            (Ok(Some((f, used))), Ok(Some((g, used2)))) => {
                assert_eq!(used, used2);
                assert_eq!((f.kind, f.seq, f.body), (g.kind, g.seq, &g.body[..]));
                let Ok(Some(t)) = tokio else {
                    panic!("the tokio codec disagrees: {tokio:?}");
                };
                assert_eq!(t, g);
                assert!(used <= rest.len() && used >= wasmbed_protocol::PREFIX);
                bodies(f.kind, f.body);
                rest = &rest[used..];
            }
            (Ok(None), Ok(None)) => {
                assert!(matches!(tokio, Ok(None)));
                return;
            }
            (Err(a), Err(b)) => {
                assert_eq!(a, b);
                match tokio {
                    Err(wasmbed_protocol::codec::CodecError::Protocol(c)) => assert_eq!(a, c),
                    other => panic!("the tokio codec disagrees: {other:?} / {a:?}"),
                }
                return;
            }
            (a, b) => panic!("the readers disagree: {a:?} / {b:?}"),
        }
    }
}

fn bodies(kind: wasmbed_protocol::Kind, body: &[u8]) {
    use wasmbed_protocol::body::{CheckpointRef, ErrorRef, GoawayRef, HelloRef, WelcomeRef};
    use wasmbed_protocol::{Checkpoint, ErrorBody, Frame, Goaway, Hello, Kind, Welcome};

    /// Reads a body both ways; where both read it they agree; the borrowed one re-encoded
    /// reads back through the owned reader as the same value.
    macro_rules! agree {
        ($r:ty, $o:ty, $name:literal, $same:expr) => {{
            let frame = Frame::new(kind, 0, body.to_vec());
            let owned = frame.decode_body::<$o>($name);
            if let Ok(r) = <$r>::decode(body) {
                let mut out = vec![0u8; body.len() + 64];
                let n = r.encode(&mut out).expect("room for what was read");
                let again = Frame::new(kind, 0, out[..n].to_vec())
                    .decode_body::<$o>($name)
                    .expect("the owned reader reads the borrowed writer");
                let same: fn(&$r, &$o) -> bool = $same;
                assert!(same(&r, &again), "{:?} re-read as {:?}", r, again);
                if let Ok(o) = &owned {
                    assert!(same(&r, o), "{:?} read as {:?}", r, o);
                }
            }
        }};
    }
    match kind {
        Kind::Hello => agree!(HelloRef<'_>, Hello, "HELLO", |r, o| r.device == o.device
            && r.app == o.app
            && r.resume == o.resume.as_deref().map(|b| &b[..])),
        Kind::Welcome => agree!(WelcomeRef<'_>, Welcome, "WELCOME", |r, o| r.session
            == o.session
            && r.gateway == o.gateway
            && r.resume_refused == o.resume_refused.as_deref()
            && r.resumed.map(|x| (x.seq, x.state))
                == o.resumed.as_ref().map(|x| (x.seq, x.state.as_str()))),
        Kind::Checkpoint => agree!(CheckpointRef<'_>, Checkpoint, "CHECKPOINT", |r, o| r.ticket
            == &o.ticket[..]),
        Kind::Error => agree!(ErrorRef<'_>, ErrorBody, "ERROR", |r, o| r.code == o.code
            && r.text == o.text),
        Kind::Goaway => agree!(GoawayRef<'_>, Goaway, "GOAWAY", |r, o| r.reason == o.reason),
        _ => {}
    }
}

/// The gateway's PROXY v2 reader: any bytes are a header or a refusal, never a panic.
pub fn proxy_v2(data: &[u8]) {
    let _ = wasmbed_gateway::proxy_header::parse(data);
}

/// A ring with one fixed key (the fuzzer cannot forge a tag, so the arbitrary bytes also go
/// straight to the plaintext reader).
fn ring() -> wasmbed_gateway::ticket::KeyRing {
    let text = "[[key]]\nid = \"k1\"\nkey = \"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\"\n";
    wasmbed_gateway::ticket::KeyRing::from_toml(text, std::path::Path::new("<fuzz>"))
        .expect("a valid ring")
}

/// Ticket opening under a valid key: arbitrary bytes as a session ticket and as a TLS
/// ticket are refused (no forged tag); as a plaintext they are a body or a refusal, and a
/// body sealed again opens to itself.
pub fn ticket(data: &[u8]) {
    use rustls::server::ProducesTickets;
    use wasmbed_gateway::ticket::{RingTicketer, SessionTickets, read_plaintext};

    let ring = ring();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    assert!(
        ring.open(data, now).is_err(),
        "a forged session ticket opened"
    );
    let ring = std::sync::Arc::new(arc_swap::ArcSwapOption::from_pointee(ring));
    let tls = RingTicketer {
        keys: ring.clone(),
        lifetime: 60,
        domain: wasmbed_gateway::ticket::GATEWAY_TLS,
    };
    assert!(tls.decrypt(data).is_none(), "a forged TLS ticket opened");
    let guard = ring.load();
    let Some(ring) = guard.as_ref() else { return };
    if let Ok(body) = read_plaintext(data, now) {
        let sealed = ring.seal(&body).expect("sealed");
        assert_eq!(ring.open(&sealed, now).ok(), Some(body));
        // A session ticket is not a TLS ticket.
        assert!(tls.decrypt(&sealed).is_none());
    }
    // And a TLS ticket (over any plaintext) is not a session ticket.
    if let Some(tls_ticket) = tls.encrypt(data) {
        assert_eq!(tls.decrypt(&tls_ticket).as_deref(), Some(data));
        assert!(
            ring.open(&tls_ticket, now).is_err(),
            "a TLS ticket opened as a session"
        );
    }
}

/// The proxy's TOML config with its validation: an error or a config, never a panic.
pub fn proxy_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = wasmbed_config::proxy::ProxyConfig::from_toml(text);
    }
}

/// The gateway's TOML config with its validation.
pub fn gateway_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = wasmbed_config::gateway::GatewaySettings::from_toml(text);
    }
}

/// The proxy's anchored session (the sans-I/O core) driven by any sequence of device,
/// gateway, health and time events against model peers: after every step answers reach the
/// device in order and once, the ticket never goes back, the window stays bounded; at the
/// end every DATA was answered exactly once and the app's state moved with every move that
/// had a ticket.
pub fn anchor(data: &[u8]) {
    use wasmbed_proxy::anchor::core::model::{Op, World};
    let mut u = Unstructured::new(data);
    let run = |u: &mut Unstructured<'_>| -> Result<World> {
        let mut world = World::new(u.int_in_range(0..=3)?);
        for _ in 0..160 {
            if u.is_empty() {
                break;
            }
            let op = match u.int_in_range(0..=19)? {
                0..=5 => Op::Data(u.int_in_range(1..=119)?),
                6 => Op::Ping,
                7 => Op::Split(u.int_in_range(1..=39)?),
                8..=13 => Op::Deliver(u.int_in_range(0..=5)?),
                14 => Op::Push,
                15 => Op::Crash,
                16 => Op::Goaway,
                17 => Op::Down {
                    answers: u.arbitrary()?,
                },
                18 => match u.int_in_range(0..=2)? {
                    0 => Op::Hang,
                    n => Op::Order(n == 1),
                },
                _ => Op::Wait(u.int_in_range(0..=1499)?),
            };
            world.apply(op);
        }
        Ok(world)
    };
    if let Ok(mut world) = run(&mut u) {
        world.finish();
        world.verdict();
    }
}

/// The anchor's core between a hostile device and hostile gateways: frames of any kind and
/// sequence (or any bytes) from either side, cut anywhere, a WELCOME saying anything at each
/// move (at once, or later while the device goes on), the driver's events between them. Each
/// peer is told only what it may be, and the session's memory stays bounded
/// (`anchor::core::hostile`, checked after every step).
pub fn anchor_peers(data: &[u8]) {
    use wasmbed_proxy::anchor::core::hostile::{Event, Landing, Peers};
    let mut u = Unstructured::new(data);
    let start = |u: &mut Unstructured<'_>| -> Result<Peers> {
        let resumed: Option<u8> = u.arbitrary()?;
        Ok(Peers::new(resumed.map(u64::from), u.arbitrary()?))
    };
    let Ok(mut peers) = start(&mut u) else { return };
    let mut next = [0u64; 2];
    for _ in 0..200 {
        if u.is_empty() || peers.ended() {
            break;
        }
        let event = match u.int_in_range(0..=15).unwrap_or(0) {
            0..=4 => Event::Device(peer_bytes(&mut u, &mut next).unwrap_or_default()),
            5..=9 => Event::Gateway(peer_bytes(&mut u, &mut next).unwrap_or_default()),
            10 => Event::GatewayClosed(u.arbitrary().unwrap_or(false)),
            11 => Event::Down,
            12 => Event::Wait(
                u.int_in_range(0..=1500).unwrap_or(0),
                u.arbitrary().unwrap_or(false),
            ),
            13 => Event::Order(
                u.arbitrary().unwrap_or(false),
                u.int_in_range(0..=500).unwrap_or(0),
            ),
            14 => match u.int_in_range(0..=2).unwrap_or(0) {
                0 => Event::Withdraw,
                1 => Event::DeviceDone,
                _ => Event::HandBack,
            },
            _ => Event::Land,
        };
        let mut land = || {
            let mut landing = |u: &mut Unstructured<'_>| -> Result<Landing> {
                match u.int_in_range(0..=7)? {
                    0 => return Ok(Landing::Failed),
                    1 | 2 => return Ok(Landing::Later),
                    _ => {}
                }
                let resumed: Option<u8> = u.arbitrary()?;
                let rest = if u.arbitrary()? {
                    peer_bytes(u, &mut next)?
                } else {
                    Vec::new()
                };
                Ok(Landing::Welcome(resumed.map(u64::from), rest))
            };
            landing(&mut u).unwrap_or(Landing::Failed)
        };
        peers.apply(event, &mut land);
    }
}

/// What a hostile peer sends in one read: up to four frames of any kind, small sequences
/// (so they meet the session's) or any, a body of any bytes or a well-formed CHECKPOINT's;
/// or any bytes at all. Most DATA and answers take the next sequence of their own count in
/// `next` (DATA, answers), so that sessions get far: a window that fills, tickets that cover
/// it, answers that prune it.
fn peer_bytes(u: &mut Unstructured<'_>, next: &mut [u64; 2]) -> Result<Vec<u8>> {
    use wasmbed_protocol::{Frame, Kind};
    if u.ratio(1, 8)? {
        let n = u.int_in_range(1..=64)?;
        return Ok(u.bytes(n)?.to_vec());
    }
    let mut out = Vec::new();
    for _ in 0..u.int_in_range(1..=4)? {
        let kind = *u.choose(&Kind::ALL)?;
        let count = match kind {
            Kind::Data => Some(0),
            Kind::Reply | Kind::Error | Kind::Checkpoint => Some(1),
            _ => None,
        };
        let seq = match count {
            Some(i) if u.ratio(3, 4)? => {
                // An answer or a CHECKPOINT at the count so far; a DATA one past it.
                next[i] += u64::from(i == 0 || kind != Kind::Checkpoint);
                next[i]
            }
            _ if u.ratio(1, 16)? => u.arbitrary()?,
            _ => u.int_in_range(0..=24)?,
        };
        if kind == Kind::Checkpoint && u.arbitrary()? {
            let n = u.int_in_range(0..=16)?;
            let ticket = u.bytes(n)?;
            out.extend(wasmbed_proxy::anchor::core::hostile::checkpoint(
                seq, ticket,
            ));
            continue;
        }
        let n = u.int_in_range(0..=300)?;
        out.extend(Frame::new(kind, seq, u.bytes(n)?.to_vec()).encode());
    }
    Ok(out)
}

/// The device SDK's session driven by any sequence of sends, partial reads and writes,
/// drops, GOAWAYs, timeouts and refused tickets against a model gateway: every DATA gets
/// exactly one answer event, in order; the app's state holds every DATA once; nothing lost.
pub fn device(data: &[u8]) {
    use wasmbed_device::model::{Op, World};
    let mut u = Unstructured::new(data);
    let run = |u: &mut Unstructured<'_>| -> Result<World> {
        let mut config = device_config();
        if u.arbitrary()? {
            config.window = 4 * 14; // four DATA: evictions
        }
        let mut world = World::new(&config, u.int_in_range(1..=5)?);
        for _ in 0..240 {
            if u.is_empty() {
                break;
            }
            let op = match u.int_in_range(0..=15)? {
                0..=3 => Op::Send,
                4..=7 => Op::ToGateway(u.int_in_range(1..=63)?),
                8..=11 => Op::ToDevice(u.int_in_range(1..=63)?),
                12 => Op::Drop,
                13 => Op::Goaway(u.arbitrary()?),
                14 => Op::Tick(u.int_in_range(0..=2999)?),
                _ => Op::RefuseTickets(u.arbitrary()?),
            };
            world.apply(op);
        }
        Ok(world)
    };
    if let Ok(mut world) = run(&mut u) {
        world.finish();
    }
}

/// The device SDK's session fed arbitrary bytes by its peer, in chunks: no panic, and the
/// connection is open or being closed (for a defined cause), never anything else.
pub fn device_peer(data: &[u8]) {
    use wasmbed_device::Status;
    use wasmbed_device::model::World;
    let mut world = World::new(&device_config(), 1);
    let mut u = Unstructured::new(data);
    // Half the runs from a ticket kept across a reboot: a WELCOME `resumed` then meets a
    // ticket and the resume's paths.
    if u.arbitrary::<bool>().unwrap_or(false) {
        let seq = u.int_in_range(0..=8).unwrap_or(0);
        if world.s.restore(seq, b"a ticket kept across a reboot") {
            // DATA goes on after the ticket's, as after a reboot.
            (world.sent, world.app.answered) = (seq, seq);
        }
    }
    world.service();
    world.deliver_up(usize::MAX);
    while !u.is_empty() {
        let n = u.int_in_range(0..=96).unwrap_or(0);
        let chunk = u.bytes(n.min(u.len())).unwrap_or(&[]);
        world.peer_bytes(chunk);
        assert!(matches!(
            world.s.status(),
            Status::Connected | Status::Close
        ));
    }
}

fn device_config() -> wasmbed_device::Config<'static> {
    let mut c = wasmbed_device::Config::new("device-0001", "counter");
    c.window = 1024;
    c.max_frame = 512;
    c.max_ticket = 64;
    c.seed = 7;
    c
}

/// The QUIC listener's intake (`wasmbed_proxy::quic::intake`), against a model: datagrams
/// read from the kernel in batches (raw bytes, or bytes under an ID the endpoint issued, in
/// a long or short header: a fuzzer cannot guess the keyed tag), and serves of the held ones
/// in between. What is not a newcomer comes out of its batch at once, in order, untouched;
/// every newcomer is held and comes out later, newest first, untouched (none dropped: the
/// inputs stay far under the bound and nothing ages); nothing else comes out.
pub fn quic_intake(data: &[u8]) {
    let _ = intake_against_model(&mut Unstructured::new(data));
}

fn intake_against_model(u: &mut Unstructured<'_>) -> Result<()> {
    use std::io::IoSliceMut;
    use std::net::SocketAddr;
    use std::time::Instant;

    use quinn::ConnectionIdGenerator;
    use quinn::udp::RecvMeta;
    use wasmbed_proxy::quic::intake::{Held, Ids, newcomer};

    const SLOT: usize = 1500;
    let ids = Ids::from_key(0x1d5);
    let mut issuer = ids.generator();
    let mut held = Held::new(ids, Duration::from_secs(3600));
    let now = Instant::now();
    // The model: newcomers held, oldest first, each with the port it came from.
    let mut model: Vec<(u16, Vec<u8>)> = Vec::new();
    let mut port = 0u16;
    while !u.is_empty() {
        let slots = u.int_in_range(1..=4)?;
        let mut storage = vec![vec![0u8; SLOT]; slots];
        let mut metas = vec![RecvMeta::default(); slots];
        if u.arbitrary::<bool>()? {
            // A read: `n` datagrams into quinn's buffers, then sorted.
            let n = u.int_in_range(0..=slots)?;
            let mut read = Vec::new();
            for (buf, meta) in storage.iter_mut().zip(metas.iter_mut()).take(n) {
                let len = u.int_in_range(0..=SLOT)?;
                let mut bytes = u.bytes(len)?.to_vec();
                let id = issuer.generate_cid();
                match u.int_in_range(0..=2u8)? {
                    1 if bytes.len() > 9 => bytes[1..9].copy_from_slice(&id),
                    2 if bytes.len() > 14 => {
                        bytes[0] |= 0x80;
                        bytes[5] = 8;
                        bytes[6..14].copy_from_slice(&id);
                    }
                    _ => {}
                }
                let len = bytes.len();
                buf[..len].copy_from_slice(&bytes);
                port = port.wrapping_add(1);
                *meta = RecvMeta {
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    len,
                    stride: len,
                    ..RecvMeta::default()
                };
                read.push((port, bytes));
            }
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let kept = held.sort(&mut bufs, &mut metas, n, now);
            let check = ids.generator();
            let (newcomers, rest): (Vec<_>, Vec<_>) =
                read.into_iter().partition(|(_, d)| newcomer(d, &check));
            assert_eq!(kept, rest.len(), "what is not a newcomer goes on at once");
            for (i, (port, d)) in rest.iter().enumerate() {
                assert_eq!(metas[i].addr.port(), *port, "in order");
                assert_eq!(&storage[i][..metas[i].len], &d[..], "untouched");
            }
            model.extend(newcomers);
        } else {
            // A serve: newest first, as many as the buffers take.
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let served = held.serve(&mut bufs, &mut metas, now);
            assert_eq!(served, slots.min(model.len()), "as many as fit");
            for i in 0..served {
                let (port, d) = model.pop().expect("the model holds as many");
                assert_eq!(metas[i].addr.port(), port, "newest first");
                assert_eq!(&storage[i][..metas[i].len], &d[..], "untouched");
            }
        }
        assert_eq!(held.len(), model.len(), "none lost, none invented");
    }
    Ok(())
}

/// The joining of TLS handshake messages across records (`wasmbed_proxy::tls_joiner`), against
/// what the messages are by construction: messages the fuzzer chooses (any type, payloads of
/// up to 80 bytes, or a length of 2^24 - 1 with nothing after it), the last one possibly cut
/// short, encoded, then cut into records anywhere (empty ones too), taken by the joiner's model
/// side (`tls_joiner::model::Noted`: it refuses type 0xff at its first byte, a length over its
/// bound at the header, and type 0xfe handed over when it does not end its record; it reads
/// even types and skips odd ones). The joiner hands over the
/// messages in order, each payload as sent (or skipped), each marked as ending its record
/// exactly where it does; it stops at the first refusal, holding nothing; what it holds at the
/// end is what the last message's part calls for (a header's first bytes, a payload read so
/// far in room for all of it, nothing of one skipped).
pub fn handshake_joiner(data: &[u8]) {
    let _ = joiner_against_construction(&mut Unstructured::new(data));
}

fn joiner_against_construction(u: &mut Unstructured<'_>) -> Result<()> {
    use wasmbed_proxy::tls_joiner::Joiner;
    use wasmbed_proxy::tls_joiner::model::{Noted, Refusal};

    // The messages: type, declared length, payload (empty under the huge length).
    let bound = usize::from(u.int_in_range(0..=64u8)?);
    let mut messages = Vec::new();
    for _ in 0..u.int_in_range(0..=6u8)? {
        let typ: u8 = u.arbitrary()?;
        if u.ratio(1, 16)? {
            messages.push((typ, 0xff_ffff_usize, Vec::new()));
        } else {
            let len = usize::from(u.int_in_range(0..=80u8)?);
            messages.push((typ, len, u.bytes(len)?.to_vec()));
        }
    }
    let mut stream = Vec::new();
    let mut spans = Vec::new();
    for (typ, len, payload) in &messages {
        let start = stream.len();
        stream.push(*typ);
        stream.extend_from_slice(&u32::try_from(*len).unwrap_or(0).to_be_bytes()[1..]);
        stream.extend_from_slice(payload);
        spans.push((start, start + 4 + len));
    }
    // The last message cut short: the stream ends inside it (after 1 to all but one of its
    // bytes; a message of the huge length has only its header anyway).
    if let Some(&(start, end)) = spans.last()
        && u.arbitrary()?
    {
        let keep = 1 + usize::from(u.arbitrary::<u16>()?) % (end - start - 1);
        stream.truncate(start + keep);
    }
    // The records: cuts of up to 48 bytes, the last record what remains.
    let mut ends = Vec::new();
    let mut edge = 0;
    for _ in 0..u.int_in_range(0..=8u8)? {
        edge = (edge + usize::from(u.int_in_range(0..=48u8)?)).min(stream.len());
        ends.push(edge);
    }
    ends.push(stream.len());
    let record_end = |end: usize| ends.iter().copied().find(|&e| end - 1 < e);

    // What should come of it, message by message.
    let mut expected = Vec::new();
    // A refusal, or what is held of a message begun and not ended (`None`: all whole).
    let mut outcome: std::result::Result<Option<(usize, usize)>, Refusal> = Ok(None);
    for ((typ, len, payload), &(start, end)) in messages.iter().zip(&spans) {
        let have = stream.len().min(end) - start;
        if *typ == 0xff {
            outcome = Err((*typ, None));
            break;
        }
        if have < 4 {
            outcome = Ok(Some((have, 0)));
            break;
        }
        if *len > bound {
            outcome = Err((*typ, Some(*len)));
            break;
        }
        let read = typ.is_multiple_of(2);
        if have < 4 + len {
            outcome = Ok(Some(if read { (have - 4, *len) } else { (0, 0) }));
            break;
        }
        let last = record_end(end) == Some(end);
        if *typ == 0xfe && !last {
            outcome = Err((*typ, Some(usize::MAX)));
            break;
        }
        expected.push((*typ, read.then(|| payload.clone()), last));
    }

    let mut side = Noted {
        bound,
        messages: Vec::new(),
    };
    let mut joiner = Joiner::default();
    let mut from = 0;
    let mut refused = None;
    for &to in &ends {
        if let Err(e) = joiner.feed(&stream[from..to], &mut side) {
            refused = Some(e);
            break;
        }
        from = to;
    }
    assert_eq!(side.messages, expected, "the messages handed over");
    match outcome {
        Err(e) => {
            assert_eq!(refused, Some(e), "refused where it should be");
            assert_eq!(joiner.kept(), (0, 0), "something held after a refusal");
        }
        Ok(held) => {
            assert_eq!(refused, None, "refused where it should not be");
            assert_eq!(joiner.pending(), held.is_some(), "a message begun");
            assert_eq!(joiner.kept(), held.unwrap_or((0, 0)), "held at the end");
        }
    }
    Ok(())
}
