//! The comparison of the two ends after each piece, and the differences by design it allows.

use rustls::Error;

use super::WITHOUT_DATA;
use super::ends::End;
use super::sent::Seen;

/// Which side the proxy's end is, and whether the suite is TLS 1.2's.
#[derive(Clone, Copy)]
pub(super) struct Sides {
    /// A gateway's client (else a device's server).
    pub(super) gateway: bool,
    pub(super) tls12: bool,
}

/// How the comparison goes on after a piece.
pub(super) enum Verdict {
    /// Both read on.
    Go,
    /// Both are over, or they differ as the record layer does by design.
    Over,
    /// The record layer refused, rustls not yet: it takes the rest alone.
    Early,
}

/// Compares the two ends after a piece, `seen` what the peer had sent by the record the
/// layer refused (if it did), and by the piece's end.
pub(super) fn compare(ends: &[End; 2], (by_refused, seen): (Seen, Seen), sides: Sides) -> Verdict {
    let [ours, theirs] = ends;
    held_to_bound(ours, sides.tls12);
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

/// The record layer judges a record's length at its header, against TLS 1.3's bound (2^14 +
/// 256 bytes of ciphertext, RFC 8446 §5.2) or TLS 1.2's (under 2^14 + 2048, rustls'). rustls
/// refuses a record too long for its plaintext only once it is whole and decrypted, so
/// against rustls the layer's bound could move either way and only refuse sooner or later;
/// held here to the bound itself: the record it waits on is within it, and one it refuses at
/// its header (`MessageTooLarge`) is past it.
fn held_to_bound(ours: &End, tls12: bool) {
    let Some(&[_, _, _, high, low]) = ours.incoming.get(..5) else {
        return;
    };
    let len = usize::from(u16::from_be_bytes([high, low]));
    let max = if tls12 {
        (1 << 14) + 2048 - 1
    } else {
        (1 << 14) + 256
    };
    let at_header = matches!(
        ours.refused,
        Some(Error::InvalidMessage(
            rustls::InvalidMessage::MessageTooLarge
        ))
    );
    if ours.refused.is_none() || at_header {
        assert_eq!(at_header, len > max, "a header of {len} bytes judged");
    }
}

/// Whether the record layer refused with `e`, at a record whose first byte is `first`, what
/// rustls takes, by design (docs/proxy.md): a 33rd key update or ticket without a record of
/// data between (rustls resets its bound at an empty one, and has none on tickets); a
/// handshake record of nothing (RFC 8446 §5.1 forbids sending one; rustls takes it as an empty
/// record of data); a TLS 1.3 record whose outer type is not application data's (RFC 8446 §5
/// asks for it to be refused; rustls decrypts a record of any type it knows as if it were
/// application data's, its additional data always built with that type).
fn layer_differs(e: &Error, first: Option<&u8>, seen: Seen, sides: Sides) -> bool {
    use rustls::{ContentType, HandshakeType, PeerMisbehaved};
    let Sides { gateway, tls12 } = sides;
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
