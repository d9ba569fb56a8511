//! What the peer sent, op by op, that the two ends may take differently.

use super::peer::{client_hello, ticket};
use super::{KEY_UPDATE, NEW_SESSION_TICKET, Op, handshake_records};

/// The most of what the two ends may take differently that the peer had sent by some point.
#[derive(Clone, Copy, Default)]
pub(super) struct Seen {
    /// Key updates and tickets since the last record of data that was not empty.
    pub(super) key_updates: usize,
    pub(super) tickets: usize,
    /// A handshake record on TLS 1.2, the proxy a device's server.
    pub(super) tls12_request: bool,
    /// A handshake record of no message's bytes.
    pub(super) empty_handshake: bool,
}

/// What the peer sent so far that the two ends may take differently.
#[derive(Default)]
pub(super) struct Sent {
    pub(super) now: Seen,
    /// Where each op's bytes start on the wire, and what had been sent by its end.
    pub(super) timeline: Vec<(usize, Seen)>,
    /// The handshake messages' bytes not yet whole.
    pending: Vec<u8>,
    /// Where the last op's bytes start, on each wire.
    pub(super) last: [usize; 2],
}

impl Sent {
    /// The most the peer had sent of each by the time `to` bytes of the wire are fed (an op
    /// begun counts whole).
    pub(super) fn by(&self, to: usize) -> Seen {
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
    /// changed record is refused by both ends, or waited on by both when cut short or made
    /// longer, or taken by both as sealed when only its version changed on TLS 1.3).
    pub(super) fn note(&mut self, op: &Op, tls12: bool, gateway: bool) {
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
