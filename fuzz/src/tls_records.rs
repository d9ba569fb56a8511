//! The proxy's TLS record layer after the handshake (`proxy::tls_records`, the records both of
//! its TLS over TCP sides use once rustls has handed over the secrets) beside rustls' own
//! connection, fed the same records.
//!
//! Each input makes two real handshakes of one suite (TLS 1.3 or 1.2, AES-GCM or
//! ChaCha20-Poly1305), the proxy's end on one side (a device's server or a gateway's client):
//! one whose end becomes the record layer, one whose end stays rustls' buffered connection.
//! The peer of each hands its keys to this target, which seals the input's records under them:
//! data, padding, empty records, records of any type and content, handshake messages split
//! anywhere, key updates (the peer's keys move on after one), tickets, requests to
//! renegotiate, alerts, raw bytes, headers alone, and records changed, cut or given another
//! version after sealing. Both ends are fed the same bytes in the same pieces.
//!
//! Asserted after every piece: both ends have handed over the same data, the same refusal or
//! none, both have seen the peer's `close_notify` or neither. They may differ only where the
//! record layer differs by design (docs/proxy.md says where), each allowance named in
//! [`compare()`]:
//! - it refuses sooner: it judges a record's header as its bytes come and its length against
//!   TLS 1.3's own bound, a handshake message by its first byte, where rustls waits for the
//!   whole record (under 2^14 + 2048 bytes) or message; then rustls must refuse later, having
//!   handed over nothing more, or still wait for the rest of a record the wire ends in;
//! - it refuses what rustls takes: a 33rd key update or ticket without a record of data
//!   between (rustls resets its bound at an empty one, and has none on tickets), a handshake
//!   record of nothing, a TLS 1.3 record whose outer type is not application data's;
//! - rustls refuses what the record layer takes: a TLS 1.2 request to renegotiate that rustls
//!   parses and the record layer declines unread.
//!
//! When both read on to the end, each seals a write that the peer must open after whatever
//! they sent back, and both must have sent back the same kinds of thing (answers to requests
//! for new keys, warnings that decline a request to renegotiate); every record either sent
//! back must open under the peer's keys, nothing after a fatal alert.

mod compare;
mod ends;
mod handshake;
mod peer;
mod sent;

use arbitrary::{Result, Unstructured};
// The suites the record layer seals, each negotiated alone.
use wasmbed_proxy::tls_records::ECDSA_SUITES as SUITES;

use compare::{Sides, Verdict, compare};
use ends::{End, Engine};
use handshake::pair;
use peer::Peer;
use sent::Sent;

/// A handshake message's types this target seals on purpose.
const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;
/// The bounds on key updates and tickets between records of data, the record layer's.
const WITHOUT_DATA: usize = 32;

/// One thing the peer sends.
#[derive(Debug)]
enum Op {
    /// Application data (empty or not), padded on TLS 1.3.
    Data(Vec<u8>, u8),
    /// `n` empty records of data.
    Empty(u8),
    /// A record of any (inner) type and content, padded on TLS 1.3.
    Record(u8, Vec<u8>, u8),
    /// A record of `typ` whose content is about 2^14 bytes, `delta` off (up to 2,499 either
    /// way: past TLS 1.2's bound of 2^14 + 2048 bytes of ciphertext too).
    Large(u8, i16),
    /// Handshake bytes in records cut at the given lengths (the last record the rest).
    Handshake(Vec<u8>, Vec<u8>),
    /// A `KeyUpdate` with this request byte; the peer's keys move on after one it means.
    KeyUpdate(u8),
    /// A `NewSessionTicket` whose payload is this long (at least 13).
    Ticket(u16),
    /// Key updates (asking for none back), each in a record of its own: up to 39.
    KeyUpdates(u8),
    /// Tickets of one byte in one record: up to 39.
    Tickets(u8),
    /// The peer's request to renegotiate (TLS 1.2): a gateway's HelloRequest, a device's
    /// ClientHello.
    Renegotiate,
    /// An alert of this level and description.
    Alert(u8, u8),
    /// Bytes on the wire as they are.
    Raw(Vec<u8>),
    /// A record's header alone: type, version, and a length chosen by [`header_len`].
    Header(u8, u16, u8, u16),
}

/// A change to the last op's bytes, after sealing.
#[derive(Debug)]
enum Change {
    /// One of them changed.
    Flip(u16, u8),
    /// Cut short.
    Cut(u16),
    /// Each record given this version in its header.
    Version(u16),
    /// The first record given a length chosen by [`header_len`] in its header.
    Length(u8, u16),
}

/// One step of the input: an op sent, or a change to the last one's bytes.
#[derive(Debug)]
enum Step {
    Send(Op),
    Change(Change),
}

/// One step from the fuzzer's bytes.
fn step(u: &mut Unstructured<'_>) -> Result<Step> {
    use Step::{Change as C, Send as S};
    // Steps added since the corpus was grown share the number of raw bytes, so that a kept
    // input is read as before up to its first step of that number (`Large`'s wider range
    // aside: a kept input may seal a larger record than it did).
    Ok(match u.int_in_range(0..=13u8)? {
        0 => S(Op::Data(u.arbitrary()?, u.arbitrary()?)),
        1 => S(Op::Empty(u.arbitrary()?)),
        2 => S(Op::Record(u.arbitrary()?, u.arbitrary()?, u.arbitrary()?)),
        3 => S(Op::Large(u.arbitrary()?, u.arbitrary()?)),
        4 => S(Op::Handshake(u.arbitrary()?, u.arbitrary()?)),
        5 => S(Op::KeyUpdate(u.arbitrary()?)),
        6 => S(Op::Ticket(u.arbitrary()?)),
        7 => S(Op::Renegotiate),
        8 => S(Op::Alert(u.arbitrary()?, u.arbitrary()?)),
        9 => match u.int_in_range(0..=3u8)? {
            0 => S(Op::Raw(u.arbitrary()?)),
            1 => S(Op::Header(
                u.arbitrary()?,
                u.arbitrary()?,
                u.arbitrary()?,
                u.arbitrary()?,
            )),
            2 => C(Change::Version(u.arbitrary()?)),
            _ => C(Change::Length(u.arbitrary()?, u.arbitrary()?)),
        },
        10 => C(Change::Flip(u.arbitrary()?, u.arbitrary()?)),
        11 => C(Change::Cut(u.arbitrary()?)),
        12 => S(Op::KeyUpdates(u.arbitrary()?)),
        _ => S(Op::Tickets(u.arbitrary()?)),
    })
}

/// The fuzz target.
pub fn tls_records(data: &[u8]) {
    let _ = against_rustls(&mut Unstructured::new(data));
}

fn against_rustls(u: &mut Unstructured<'_>) -> Result<()> {
    let suite = SUITES[u.choose_index(SUITES.len())?];
    let gateway: bool = u.arbitrary()?;
    let mut steps = Vec::new();
    for _ in 0..u.int_in_range(0..=24u8)? {
        steps.push(step(u)?);
    }
    let pieces: Vec<u16> = u.arbitrary()?;

    // In every pair below, the record layer's side first, rustls' second.
    let (ours, ours_peer) = pair(suite, gateway, true);
    let (theirs, their_peer) = pair(suite, gateway, false);
    let (mut engines, mut peers) = ([ours, theirs], [ours_peer, their_peer]);
    let sides = Sides {
        gateway,
        tls12: peers[0].tls12,
    };
    let (mut wires, sent) = seal_all(&steps, &mut peers, gateway);
    let mut ends = [End::default(), End::default()];
    match feed(&mut engines, &mut ends, &wires, pieces, (&sent, sides)) {
        Fed::Over => {}
        Fed::Whole if ends[0].over() => {}
        Fed::Whole => {
            read_on(&mut engines, &mut ends, &mut peers);
            return Ok(());
        }
        Fed::Early(start) => {
            let [_, engine] = &mut engines;
            let [_, peer] = &mut peers;
            rustls_refuses_too(&mut ends, (engine, peer), &mut wires[1], start);
            peers[0].open_all(&ends[0].out);
            return Ok(());
        }
    }
    for (peer, end) in peers.iter_mut().zip(&ends) {
        peer.open_all(&end.out);
    }
    Ok(())
}

/// Each side's wire: the ops sealed by its peer, and the changes to them; and what was sent,
/// op by op.
fn seal_all(steps: &[Step], peers: &mut [Peer; 2], gateway: bool) -> ([Vec<u8>; 2], Sent) {
    let mut sent = Sent::default();
    let mut wires = [Vec::new(), Vec::new()];
    for step in steps {
        match step {
            Step::Send(op) => {
                sent.note(op, peers[0].tls12, gateway);
                sent.timeline.push((wires[0].len(), sent.now));
                sent.last = [wires[0].len(), wires[1].len()];
                for (wire, peer) in wires.iter_mut().zip(peers.iter_mut()) {
                    wire.extend(peer.send(op, gateway));
                }
            }
            Step::Change(change) => {
                for (wire, at) in wires.iter_mut().zip(sent.last) {
                    apply(change, wire, at);
                }
            }
        }
    }
    assert_eq!(wires[0].len(), wires[1].len(), "the same records on both");
    (wires, sent)
}

/// How feeding the wire ended.
enum Fed {
    /// The wire fed whole: both ends read on, or are over alike.
    Whole,
    /// Both are over, or they differ as the record layer does by design.
    Over,
    /// The record layer refused from this byte of the wire on, rustls not (yet).
    Early(usize),
}

/// Feeds the same pieces to both ends, comparing them after each; once the record layer has
/// refused where rustls has not (yet), rustls alone takes the rest.
fn feed(
    engines: &mut [Engine; 2],
    ends: &mut [End; 2],
    wires: &[Vec<u8>; 2],
    pieces: Vec<u16>,
    (sent, sides): (&Sent, Sides),
) -> Fed {
    let (mut at, mut pieces) = (0, pieces.into_iter());
    let len = wires[0].len();
    let mut early = None;
    while at < len {
        let to = pieces
            .next()
            .map_or(len, |n| (at + 1 + usize::from(n) % 4096).min(len));
        for ((end, engine), wire) in ends.iter_mut().zip(engines.iter_mut()).zip(wires) {
            end.feed(engine, &wire[at..to]);
        }
        // What had been sent by the record the layer refused (the first of what it holds),
        // and by the end of the piece.
        let refused_at = ends[0]
            .refused
            .as_ref()
            .map(|_| to - ends[0].incoming.len());
        let seen = (sent.by(refused_at.map_or(to, |at| at + 1)), sent.by(to));
        match compare(ends, seen, sides) {
            Verdict::Go => {}
            Verdict::Over => return Fed::Over,
            Verdict::Early => {
                early.get_or_insert(to - ends[0].incoming.len());
            }
        }
        at = to;
    }
    early.map_or(Fed::Whole, Fed::Early)
}

/// The record layer refused from `start` on the wire, rustls not. The layer judges a record's
/// header as its bytes come (its length against TLS 1.3's bound of 2^14 + 256 bytes) and a
/// handshake message by its first byte and its header; rustls' deframer takes under 2^14 +
/// 2048 bytes and refuses a record once it is whole, and waits for a message to be whole. So
/// rustls must refuse too (later: a record of data after the wire ends a wait for a message,
/// as nothing may come between its parts), having handed over nothing more, or be waiting for
/// the rest of a record the wire ends in.
fn rustls_refuses_too(
    [ours, theirs]: &mut [End; 2],
    (engine, peer): (&mut Engine, &mut Peer),
    wire: &mut Vec<u8>,
    start: usize,
) {
    if theirs.refused.is_none() {
        let probe = peer.seal(23, b"probe", 0);
        theirs.feed(engine, &probe);
        wire.extend(probe);
    }
    assert!(
        theirs.refused.is_some() || ends_in_part(wire, start),
        "refused by the record layer only: {:?}",
        ours.refused,
    );
    assert_eq!(ours.data, theirs.data, "the data handed over");
}

/// Both read on: a write from each opens at its peer after whatever they sent back, and both
/// sent back the same kinds of thing (answers to requests for new keys, declined requests to
/// renegotiate: rustls answers each batch of records it processes, so only whether there
/// were any is the same).
fn read_on(engines: &mut [Engine; 2], ends: &mut [End; 2], peers: &mut [Peer; 2]) {
    let mut backs = Vec::new();
    for ((engine, end), peer) in engines.iter_mut().zip(ends).zip(peers) {
        engine.write(b"pong", &mut end.out);
        let back = peer.open_all(&end.out);
        assert_eq!(back.data, b"pong", "a write after the records");
        assert_eq!(back.fatal, None, "a fatal alert, read on");
        backs.push(back);
    }
    let [ours, theirs] = &backs[..] else {
        unreachable!("two ends")
    };
    assert_eq!(ours.key_updates > 0, theirs.key_updates > 0, "keys updated");
    assert_eq!(
        ours.warnings.is_empty(),
        theirs.warnings.is_empty(),
        "warnings"
    );
}

/// Whether the records on `wire` from `at` on, by their headers, end in one cut short.
fn ends_in_part(wire: &[u8], mut at: usize) -> bool {
    while at < wire.len() {
        let Some(&[high, low]) = wire.get(at + 3..at + 5) else {
            return true;
        };
        at += 5 + usize::from(u16::from_be_bytes([high, low]));
    }
    at > wire.len()
}

/// `bytes` in the parts `cuts` makes of it: parts of the lengths it says (or what is left),
/// then the rest.
fn handshake_records<'a>(bytes: &'a [u8], cuts: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = bytes;
    cuts.iter().map(Some).chain([None]).map(move |cut| {
        let at = cut.map_or(rest.len(), |&c| usize::from(c).min(rest.len()));
        let (part, more) = rest.split_at(at);
        rest = more;
        part
    })
}

/// A header's length: `len` itself, or within 2 of a bound on a record's length (the most
/// ciphertext TLS 1.3 and TLS 1.2 allow), as `near` says: an exact length is what finds a
/// bound moved by one, and libFuzzer's compare tracing sees `len > max` as two `usize`s,
/// eight bytes the input does not hold (docs/fuzzing.md has the runs).
fn header_len(near: u8, len: u16) -> u16 {
    let off = len % 5;
    match near % 3 {
        0 => len,
        1 => (1 << 14) + 256 - 2 + off,
        _ => (1 << 14) + 2048 - 2 + off,
    }
}

/// Applies `change` to the last op's bytes, from `at` on `wire`.
fn apply(change: &Change, wire: &mut Vec<u8>, at: usize) {
    match change {
        Change::Flip(to, xor) => flip(&mut wire[at..], *to, *xor),
        Change::Cut(len) => wire.truncate((at + usize::from(*len)).min(wire.len())),
        Change::Version(version) => set_version(&mut wire[at..], *version),
        Change::Length(near, len) => {
            if let Some(field) = wire.get_mut(at + 3..at + 5) {
                field.copy_from_slice(&header_len(*near, *len).to_be_bytes());
            }
        }
    }
}

/// Sets the version in the header of each record of `wire` whose header is whole.
fn set_version(mut wire: &mut [u8], version: u16) {
    while let Some(header) = wire.get_mut(..5) {
        header[1..3].copy_from_slice(&version.to_be_bytes());
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        wire = wire.get_mut(5 + len..).unwrap_or_default();
    }
}

/// Changes one byte of `wire`, the `at`-th (round the end), by `xor`.
fn flip(wire: &mut [u8], at: u16, xor: u8) {
    if wire.is_empty() {
        return;
    }
    let at = usize::from(at) % wire.len();
    wire[at] ^= xor;
}
