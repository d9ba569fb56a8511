//! The comparison of the two ends after each piece, and the differences by design it allows.

use rustls::Error;

use super::WITHOUT_DATA;
use super::ends::End;
use super::sent::Seen;

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
pub(super) fn compare(
    ends: &[End; 2],
    (by_refused, seen): (Seen, Seen),
    sides: (bool, bool),
) -> Verdict {
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
