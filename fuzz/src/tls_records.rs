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
//! renegotiate, alerts, raw bytes, and records changed or cut after sealing. Both ends are fed
//! the same bytes in the same pieces.
//!
//! Asserted after every piece: both ends have handed over the same data, the same refusal or
//! none, both have seen the peer's `close_notify` or neither. They may differ only where the
//! record layer differs by design (docs/proxy.md says where), each allowance named in
//! [`compare`]:
//! - it refuses sooner: it judges a record's header as its bytes come and its length against
//!   TLS 1.3's own bound, a handshake message by its first byte, where rustls waits for the
//!   whole record (up to 2^14 + 2048 bytes) or message; then rustls must refuse later, having
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

mod ends;
mod handshake;
mod peer;

use arbitrary::{Result, Unstructured};
use rustls::crypto::aws_lc_rs::cipher_suite as suites;
use rustls::{Error, SupportedCipherSuite};

use ends::End;
use handshake::pair;
use peer::{client_hello, ticket};

/// The suites the record layer seals, each negotiated alone.
const SUITES: [SupportedCipherSuite; 6] = [
    suites::TLS13_AES_128_GCM_SHA256,
    suites::TLS13_AES_256_GCM_SHA384,
    suites::TLS13_CHACHA20_POLY1305_SHA256,
    suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
];

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
    /// A record of `typ` whose content is about 2^14 bytes, `delta` off.
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
    /// The last op's bytes with one of them changed.
    Flip(u16, u8),
    /// The last op's bytes cut short.
    Cut(u16),
}

/// One op from the fuzzer's bytes.
fn op(u: &mut Unstructured<'_>) -> Result<Op> {
    Ok(match u.int_in_range(0..=13u8)? {
        0 => Op::Data(u.arbitrary()?, u.arbitrary()?),
        1 => Op::Empty(u.arbitrary()?),
        2 => Op::Record(u.arbitrary()?, u.arbitrary()?, u.arbitrary()?),
        3 => Op::Large(u.arbitrary()?, u.arbitrary()?),
        4 => Op::Handshake(u.arbitrary()?, u.arbitrary()?),
        5 => Op::KeyUpdate(u.arbitrary()?),
        6 => Op::Ticket(u.arbitrary()?),
        7 => Op::Renegotiate,
        8 => Op::Alert(u.arbitrary()?, u.arbitrary()?),
        9 => Op::Raw(u.arbitrary()?),
        10 => Op::Flip(u.arbitrary()?, u.arbitrary()?),
        11 => Op::Cut(u.arbitrary()?),
        12 => Op::KeyUpdates(u.arbitrary()?),
        _ => Op::Tickets(u.arbitrary()?),
    })
}

/// The fuzz target.
pub fn tls_records(data: &[u8]) {
    let _ = against_rustls(&mut Unstructured::new(data));
}

fn against_rustls(u: &mut Unstructured<'_>) -> Result<()> {
    let suite = SUITES[u.choose_index(SUITES.len())?];
    let gateway: bool = u.arbitrary()?;
    let mut ops = Vec::new();
    for _ in 0..u.int_in_range(0..=24u8)? {
        ops.push(op(u)?);
    }
    let pieces: Vec<u16> = u.arbitrary()?;

    let (mut ours, mut ours_peer) = pair(suite, gateway, true);
    let (mut theirs, mut their_peer) = pair(suite, gateway, false);
    let mut sent = Sent::default();
    let (mut wire, mut their_wire) = (Vec::new(), Vec::new());
    for op in &ops {
        let (a, b) = (wire.len(), their_wire.len());
        match op {
            Op::Flip(at, xor) => flip(
                &mut wire[sent.last.0..],
                &mut their_wire[sent.last.1..],
                *at,
                *xor,
            ),
            Op::Cut(len) => {
                let keep = usize::from(*len);
                wire.truncate((sent.last.0 + keep).min(wire.len()));
                their_wire.truncate((sent.last.1 + keep).min(their_wire.len()));
            }
            op => {
                sent.note(op, ours_peer.tls12, gateway);
                sent.timeline.push((a, sent.now));
                wire.extend(ours_peer.send(op, gateway));
                their_wire.extend(their_peer.send(op, gateway));
                sent.last = (a, b);
            }
        }
    }
    assert_eq!(wire.len(), their_wire.len(), "the same records on both");

    // The same pieces to both ends; once the record layer has refused where rustls has not
    // (yet), rustls alone takes the rest.
    let (mut at, mut pieces) = (0, pieces.into_iter());
    let mut ends = [End::default(), End::default()];
    let mut early = None;
    while at < wire.len() {
        let to = pieces.next().map_or(wire.len(), |n| {
            (at + 1 + usize::from(n) % 4096).min(wire.len())
        });
        ends[0].feed(&mut ours, &wire[at..to]);
        ends[1].feed(&mut theirs, &their_wire[at..to]);
        // What had been sent by the record the layer refused (the first of what it holds),
        // and by the end of the piece.
        let refused_at = ends[0]
            .refused
            .as_ref()
            .map(|_| to - ends[0].incoming.len());
        let seen = (sent.by(refused_at.map_or(to, |at| at + 1)), sent.by(to));
        match compare(&ends, seen, (gateway, ours_peer.tls12)) {
            Verdict::Go => {}
            Verdict::Over => {
                ours_peer.open_all(&ends[0].out);
                their_peer.open_all(&ends[1].out);
                return Ok(());
            }
            Verdict::Early => {
                early.get_or_insert(to - ends[0].incoming.len());
            }
        }
        at = to;
    }
    if let Some(start) = early {
        // The record layer judges a record's header as its bytes come (its length against
        // TLS 1.3's bound of 2^14 + 256 bytes) and a handshake message by its first byte and
        // its header; rustls' deframer takes up to 2^14 + 2048 bytes and refuses a record
        // once it is whole, and waits for a message to be whole. So rustls must refuse too
        // (later: a record of data after the wire ends a wait for a message, as nothing may
        // come between its parts), having handed over nothing more, or be waiting for the
        // rest of a record the wire ends in.
        if ends[1].refused.is_none() {
            let probe = their_peer.seal(23, b"probe", 0);
            ends[1].feed(&mut theirs, &probe);
            their_wire.extend(probe);
        }
        assert!(
            ends[1].refused.is_some() || ends_in_part(&their_wire, start),
            "refused by the record layer only: {:?}",
            ends[0].refused,
        );
        assert_eq!(ends[0].data, ends[1].data, "the data handed over");
        ours_peer.open_all(&ends[0].out);
        return Ok(());
    }
    if ends[0].over() {
        ours_peer.open_all(&ends[0].out);
        their_peer.open_all(&ends[1].out);
        return Ok(());
    }
    // Both read on: a write from each opens at its peer after whatever they sent back, and
    // both sent back the same kinds of thing (answers to requests for new keys, declined
    // requests to renegotiate: rustls answers each batch of records it processes, so only
    // whether there were any is the same).
    let mut backs = Vec::new();
    for (end, (engine, peer)) in ends
        .iter_mut()
        .zip([(&mut ours, &mut ours_peer), (&mut theirs, &mut their_peer)])
    {
        engine.write(b"pong", &mut end.out);
        let back = peer.open_all(&end.out);
        assert_eq!(back.data, b"pong", "a write after the records");
        assert_eq!(back.fatal, None, "a fatal alert, read on");
        backs.push(back);
    }
    let [ours_back, their_back] = &backs[..] else {
        unreachable!("two ends")
    };
    assert_eq!(
        ours_back.key_updates > 0,
        their_back.key_updates > 0,
        "keys updated"
    );
    assert_eq!(
        ours_back.warnings.is_empty(),
        their_back.warnings.is_empty(),
        "warnings"
    );
    Ok(())
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

/// How the comparison goes on after a piece.
enum Verdict {
    /// Both read on.
    Go,
    /// Both are over, or they differ as the record layer does by design.
    Over,
    /// The record layer refused, rustls not yet: it takes the rest alone.
    Early,
}

/// Compares the two ends after a piece, `seen` what the peer had sent by the record the
/// layer refused (if it did), and by the piece's end.
fn compare(ends: &[End; 2], (by_refused, seen): (Seen, Seen), sides: (bool, bool)) -> Verdict {
    let [ours, theirs] = ends;
    let layer = ours
        .refused
        .as_ref()
        .is_some_and(|e| layer_differs(e, ours.incoming.first(), by_refused, sides));
    let rustls = theirs
        .refused
        .as_ref()
        .is_some_and(|e| rustls_differs(e, seen));
    // One refused for a difference of its own: what both handed over agrees up to there.
    match (layer, rustls) {
        (true, false) => {
            assert!(theirs.data.starts_with(&ours.data), "the data handed over");
            return Verdict::Over;
        }
        (false, true) => {
            assert!(ours.data.starts_with(&theirs.data), "the data handed over");
            return Verdict::Over;
        }
        (true, true) => {
            assert!(
                theirs.data.starts_with(&ours.data) || ours.data.starts_with(&theirs.data),
                "the data handed over"
            );
            return Verdict::Over;
        }
        (false, false) => {}
    }
    let verdict = match (&ours.refused, &theirs.refused) {
        (Some(_), None) => Verdict::Early,
        (None, Some(e)) => panic!("refused by rustls only: {e:?}"),
        (Some(_), Some(_)) => Verdict::Over,
        (None, None) if ours.closed => Verdict::Over,
        (None, None) => Verdict::Go,
    };
    assert_eq!(ours.data, theirs.data, "the data handed over");
    assert_eq!(ours.closed, theirs.closed, "the peer's close_notify seen");
    verdict
}

/// Whether the record layer refused with `e`, at a record whose first byte is `first`, what
/// rustls takes, by design (docs/proxy.md): a 33rd key update or ticket without a record of
/// data between (rustls resets its bound at an empty one, and has none on tickets); a
/// handshake record of nothing (RFC 8446 §5.1 forbids sending one; rustls takes it as an empty
/// record of data); a TLS 1.3 record whose outer type is not application data's (RFC 8446 §5
/// asks for it to be refused; rustls decrypts a record of any type it knows as if it were
/// application data's, its additional data always built with that type).
fn layer_differs(
    e: &Error,
    first: Option<&u8>,
    seen: Seen,
    (gateway, tls12): (bool, bool),
) -> bool {
    use rustls::{ContentType, HandshakeType, PeerMisbehaved};
    match e {
        Error::PeerMisbehaved(PeerMisbehaved::TooManyKeyUpdateRequests) => {
            seen.key_updates > WITHOUT_DATA
        }
        Error::General(why) if why.contains("tickets") => gateway && seen.tickets > WITHOUT_DATA,
        Error::InappropriateHandshakeMessage {
            got_type: HandshakeType::HelloRequest,
            ..
        } => seen.empty_handshake,
        Error::InappropriateMessage {
            got_type: ContentType::Handshake,
            ..
        } if tls12 => seen.empty_handshake,
        Error::InappropriateMessage { got_type, .. } => {
            !tls12
                && *got_type != ContentType::ApplicationData
                && matches!(first, Some(20..=22 | 24))
        }
        _ => false,
    }
}

/// Whether rustls refused with `e` what the record layer takes, by design: a TLS 1.2 request
/// to renegotiate that rustls parses and the layer declines unread.
fn rustls_differs(e: &Error, seen: Seen) -> bool {
    use rustls::InvalidMessage as I;
    // A message's, not a header's: rustls' deframer judges a header as the layer does.
    let header = matches!(
        e,
        Error::InvalidMessage(
            I::MessageTooLarge
                | I::InvalidContentType
                | I::UnknownProtocolVersion
                | I::InvalidEmptyPayload
        )
    );
    seen.tls12_request && matches!(e, Error::InvalidMessage(_)) && !header
}

/// The most of what the two ends may take differently that the peer had sent by some point.
#[derive(Clone, Copy, Default)]
struct Seen {
    /// Key updates and tickets since the last record of data that was not empty.
    key_updates: usize,
    tickets: usize,
    /// A handshake record on TLS 1.2, the proxy a device's server.
    tls12_request: bool,
    /// A handshake record of no message's bytes.
    empty_handshake: bool,
}

/// What the peer sent so far that the two ends may take differently.
#[derive(Default)]
struct Sent {
    now: Seen,
    /// Where each op's bytes start on the wire, and what had been sent by its end.
    timeline: Vec<(usize, Seen)>,
    /// The handshake messages' bytes not yet whole.
    pending: Vec<u8>,
    /// Where the last op's bytes start, on each wire.
    last: (usize, usize),
}

impl Sent {
    /// The most the peer had sent of each by the time `to` bytes of the wire are fed (an op
    /// begun counts whole).
    fn by(&self, to: usize) -> Seen {
        self.timeline.iter().filter(|(start, _)| *start < to).fold(
            Seen::default(),
            |most, (_, seen)| Seen {
                key_updates: most.key_updates.max(seen.key_updates),
                tickets: most.tickets.max(seen.tickets),
                tls12_request: most.tls12_request || seen.tls12_request,
                empty_handshake: most.empty_handshake || seen.empty_handshake,
            },
        )
    }

    /// Notes the records of `op`, as sealed (a change to them after is not followed: a
    /// changed record is refused by both ends).
    fn note(&mut self, op: &Op, tls12: bool, gateway: bool) {
        // A TLS 1.3 record sealed with no type of its own: its type is its content's last byte
        // that is not zero, its content what comes before.
        let typed;
        let op = match op {
            Op::Record(0, content, padding) if !tls12 => {
                match content.iter().rposition(|&b| b != 0) {
                    Some(end) => {
                        typed = Op::Record(content[end], content[..end].to_vec(), *padding);
                        &typed
                    }
                    None => op,
                }
            }
            op => op,
        };
        let handshake = match op {
            Op::Data(d, _) | Op::Record(23, d, _) if !d.is_empty() => {
                (self.now.key_updates, self.now.tickets) = (0, 0);
                None
            }
            Op::Large(23, _) => {
                (self.now.key_updates, self.now.tickets) = (0, 0);
                None
            }
            Op::Record(22, content, _) | Op::Handshake(content, _) => Some(content.clone()),
            Op::Large(22, _) => Some(vec![0x5a; 4]),
            Op::KeyUpdate(request) => Some(vec![KEY_UPDATE, 0, 0, 1, *request]),
            Op::Ticket(len) => Some(ticket(usize::from(*len).max(13))),
            Op::KeyUpdates(n) => Some([KEY_UPDATE, 0, 0, 1, 0].repeat(usize::from(n % 40))),
            Op::Tickets(n) => Some(ticket(14).repeat(usize::from(n % 40))),
            Op::Renegotiate => Some(if gateway {
                vec![0, 0, 0, 0]
            } else {
                client_hello()
            }),
            _ => None,
        };
        self.now.empty_handshake |= match op {
            Op::Record(22, content, _) => content.is_empty(),
            Op::Tickets(n) => n % 40 == 0,
            Op::Handshake(bytes, cuts) => handshake_records(bytes, cuts).any(<[u8]>::is_empty),
            _ => false,
        };
        if tls12 && !gateway {
            self.now.tls12_request |= matches!(
                op,
                Op::Record(22, ..) | Op::Handshake(..) | Op::Large(22, _)
            );
        }
        let Some(bytes) = handshake else {
            return;
        };
        // The messages made whole by these bytes, counted by type.
        self.pending.extend_from_slice(&bytes);
        while let Some(header) = self.pending.get(..4) {
            let len =
                usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
            if self.pending.len() >= 4 + len {
                match header[0] {
                    KEY_UPDATE => self.now.key_updates += 1,
                    NEW_SESSION_TICKET => self.now.tickets += 1,
                    _ => {}
                }
                self.pending.drain(..4 + len);
            } else {
                break;
            }
        }
    }
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

fn flip(ours: &mut [u8], theirs: &mut [u8], at: u16, xor: u8) {
    if ours.is_empty() || xor == 0 {
        return;
    }
    let at = usize::from(at) % ours.len();
    ours[at] ^= xor;
    theirs[at] ^= xor;
}
