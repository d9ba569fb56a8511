//! The handshake messages a TLS connection's records carry after its handshake, joined across
//! records: RFC 8446 §5.1 (and RFC 5246 §6.2.1) let a sender split a message over records or
//! put several in one, and rustls' own reader joins them; the proxy's record layer
//! (`tls/records.rs`) does the same with this.
//!
//! What a side takes is the caller's ([`Messages`]): each message is judged by its type at its
//! first byte and by its length once its 4-byte header is there, before any of it is kept, so
//! a part of a message refused is never held. A message taken is handled in place when it is
//! whole in its record; one split over records is gathered into room reserved for its length
//! once its header is there (each byte copied once), or, when the caller reads nothing of it,
//! only counted off. What is kept is thus a header's first bytes (3 at most), or the payload
//! of a message the caller takes and reads, bounded by what the caller accepts as its length.
//!
//! Public for the fuzz targets (`wasmbed_fuzz::handshake_joiner`); pure: no I/O, no clock.

/// What becomes of a message's payload, once its header is judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// It is read: handed to [`Messages::message`] whole.
    Read,
    /// It is counted off unread (a message declined whatever it says).
    Skip,
}

/// The side that takes the messages.
pub trait Messages {
    type Error;
    /// Judges a message by its type alone (`len` `None`: its header is not all there yet; what
    /// it would keep is asked again with the length) or by its type and payload length. An
    /// error ends the joining: nothing of the message is kept.
    fn header(&mut self, typ: u8, len: Option<usize>) -> Result<Keep, Self::Error>;
    /// One whole message, in the order sent: its payload (`None` when skipped), and whether it
    /// ends its record (where a key change must be). An error ends the joining.
    fn message(&mut self, typ: u8, payload: Option<&[u8]>, last: bool) -> Result<(), Self::Error>;
}

/// A handshake message begun in a record and not ended in it, if any. After an error it holds
/// nothing and is not to be fed again: the connection ends there (its next bytes would be read
/// as a message's start).
#[derive(Debug, Default)]
pub struct Joiner(Partial);

#[derive(Debug, Default)]
enum Partial {
    #[default]
    None,
    /// The first bytes of a message's 4-byte header.
    Header { bytes: [u8; 4], have: u8 },
    /// A message whose payload is read: what came of it, `len` bytes in all.
    Payload { typ: u8, payload: Vec<u8>, len: u32 },
    /// A message counted off unread: `left` bytes of it to come.
    Skip { typ: u8, left: u32 },
}

/// A message's 24-bit length.
fn length([a, b, c]: [u8; 3]) -> u32 {
    u32::from_be_bytes([0, a, b, c])
}

/// A length as an index (every length here has 24 bits; on a target whose `usize` is
/// narrower, one too large to index is as large as can be, and refused by any bound).
fn index(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl Joiner {
    /// Whether a message is begun and not ended (no other record may come before its rest).
    pub fn pending(&self) -> bool {
        !matches!(self.0, Partial::None)
    }

    /// The bytes held of the message begun and not ended (a header's first bytes, or what came
    /// of a payload read), and the heap room kept for them.
    pub fn kept(&self) -> (usize, usize) {
        match &self.0 {
            Partial::None | Partial::Skip { .. } => (0, 0),
            Partial::Header { have, .. } => (usize::from(*have), 0),
            Partial::Payload { payload, .. } => (payload.len(), payload.capacity()),
        }
    }

    /// The handshake content of one record: first the rest of a message an earlier record
    /// began, then each whole one in place, and a message begun at its end kept. `content`
    /// may be empty (the caller decides whether a record of none is allowed).
    pub fn feed<M: Messages>(&mut self, content: &[u8], side: &mut M) -> Result<(), M::Error> {
        let mut rest = content;
        // Each step takes what it can of `rest`: the rest to go on with, or `None` once it
        // is all taken and the next bytes are awaited.
        while let Some(next) = match std::mem::take(&mut self.0) {
            Partial::None => self.start(rest, side)?,
            Partial::Header { bytes, have } => self.header(bytes, have, rest, side)?,
            Partial::Payload { typ, payload, len } => {
                self.payload(typ, payload, len, rest, side)?
            }
            Partial::Skip { typ, left } => self.skip(typ, left, rest, side)?,
        } {
            rest = next;
        }
        Ok(())
    }

    /// A message's start: handled in place if it is whole here, begun otherwise.
    fn start<'a, M: Messages>(
        &mut self,
        rest: &'a [u8],
        side: &mut M,
    ) -> Result<Option<&'a [u8]>, M::Error> {
        let Some(&typ) = rest.first() else {
            return Ok(None);
        };
        let [_, a, b, c, after @ ..] = rest else {
            side.header(typ, None)?;
            let mut bytes = [0; 4];
            bytes[..rest.len()].copy_from_slice(rest);
            // At most 3.
            let have = rest.len() as u8;
            self.0 = Partial::Header { bytes, have };
            return Ok(None);
        };
        let len = length([*a, *b, *c]);
        let keep = side.header(typ, Some(index(len)))?;
        let Some(payload) = after.get(..index(len)) else {
            self.0 = begin(typ, len, keep);
            return Ok(Some(after));
        };
        let rest = &after[payload.len()..];
        side.message(
            typ,
            (keep == Keep::Read).then_some(payload),
            rest.is_empty(),
        )?;
        Ok(Some(rest))
    }

    /// More of a message's header.
    fn header<'a, M: Messages>(
        &mut self,
        mut bytes: [u8; 4],
        have: u8,
        rest: &'a [u8],
        side: &mut M,
    ) -> Result<Option<&'a [u8]>, M::Error> {
        let have = usize::from(have);
        let take = (4 - have).min(rest.len());
        bytes[have..have + take].copy_from_slice(&rest[..take]);
        if have + take < 4 {
            let have = (have + take) as u8;
            self.0 = Partial::Header { bytes, have };
            return Ok(None);
        }
        let len = length([bytes[1], bytes[2], bytes[3]]);
        let keep = side.header(bytes[0], Some(index(len)))?;
        self.0 = begin(bytes[0], len, keep);
        Ok(Some(&rest[take..]))
    }

    /// More of a payload read, handed over once whole.
    fn payload<'a, M: Messages>(
        &mut self,
        typ: u8,
        mut payload: Vec<u8>,
        len: u32,
        rest: &'a [u8],
        side: &mut M,
    ) -> Result<Option<&'a [u8]>, M::Error> {
        let take = (index(len) - payload.len()).min(rest.len());
        payload.extend_from_slice(&rest[..take]);
        let rest = &rest[take..];
        if payload.len() < index(len) {
            self.0 = Partial::Payload { typ, payload, len };
            return Ok(None);
        }
        side.message(typ, Some(&payload), rest.is_empty())?;
        Ok(Some(rest))
    }

    /// More of a payload counted off unread.
    fn skip<'a, M: Messages>(
        &mut self,
        typ: u8,
        left: u32,
        rest: &'a [u8],
        side: &mut M,
    ) -> Result<Option<&'a [u8]>, M::Error> {
        let take = index(left).min(rest.len());
        if take < index(left) {
            // Less than `left`, which fits a `u32`.
            let left = left - take as u32;
            self.0 = Partial::Skip { typ, left };
            return Ok(None);
        }
        let rest = &rest[take..];
        side.message(typ, None, rest.is_empty())?;
        Ok(Some(rest))
    }
}

/// A message of `typ` whose `len` bytes of payload are to come (room for them reserved once
/// the side has accepted that length).
fn begin(typ: u8, len: u32, keep: Keep) -> Partial {
    match keep {
        Keep::Read => Partial::Payload {
            typ,
            payload: Vec::with_capacity(index(len)),
            len,
        },
        Keep::Skip => Partial::Skip { typ, left: len },
    }
}

/// A side that notes what it is handed, for the tests and the fuzz target.
#[cfg(any(test, feature = "model"))]
pub mod model {
    use super::{Keep, Messages};

    /// A refusal: the message's type, and its length when it was judged with it (`usize::MAX`
    /// for a message refused when handed over).
    pub type Refusal = (u8, Option<usize>);

    /// Refuses type 0xff at its first byte, a length over `bound` at the header, and type 0xfe
    /// handed over when it does not end its record; reads the even types, skips the odd ones;
    /// notes every message handed over.
    #[derive(Debug, Default)]
    pub struct Noted {
        pub bound: usize,
        /// Each message: type, payload (`None`: skipped), whether it ended its record.
        pub messages: Vec<(u8, Option<Vec<u8>>, bool)>,
    }

    impl Messages for Noted {
        type Error = Refusal;
        fn header(&mut self, typ: u8, len: Option<usize>) -> Result<Keep, Refusal> {
            match len {
                // By its type alone, whether or not its length is there yet.
                _ if typ == 0xff => Err((typ, None)),
                Some(len) if len > self.bound => Err((typ, Some(len))),
                _ if typ.is_multiple_of(2) => Ok(Keep::Read),
                _ => Ok(Keep::Skip),
            }
        }
        fn message(&mut self, typ: u8, payload: Option<&[u8]>, last: bool) -> Result<(), Refusal> {
            if typ == 0xfe && !last {
                return Err((typ, Some(usize::MAX)));
            }
            self.messages.push((typ, payload.map(<[u8]>::to_vec), last));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::model::Noted;
    use super::{Joiner, Keep, Messages};

    fn message(typ: u8, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        [&[typ][..], &len[1..], payload].concat()
    }

    /// A message as it should be handed over: type, payload (`None`: skipped), and the offset
    /// in the stream where it ends.
    type Expected = (u8, Option<Vec<u8>>, usize);

    /// Messages of every shape (empty, a byte, read and skipped, longer than a header): their
    /// bytes, and each as it should be handed over.
    fn stream() -> (Vec<u8>, Vec<Expected>) {
        let parts: [(u8, &[u8]); 5] = [
            (4, b"a ticket's bytes"),
            (24, &[1]),
            (1, b"declined unread"),
            (2, b""),
            (3, &[9]),
        ];
        let mut bytes = Vec::new();
        let mut expected = Vec::new();
        for (typ, payload) in parts {
            bytes.extend(message(typ, payload));
            expected.push((
                typ,
                (typ.is_multiple_of(2)).then(|| payload.to_vec()),
                bytes.len(),
            ));
        }
        (bytes, expected)
    }

    /// The same messages, in order, whatever the records they are split over (here: three
    /// records, split at every pair of places, empty ones included); each marked as ending
    /// its record exactly where it does; nothing kept in between beyond a message's own
    /// bytes, in room reserved once for what is read and none for what is skipped; nothing
    /// once all is whole.
    #[test]
    fn every_split_gives_the_same_messages() {
        let (bytes, expected) = stream();
        let longest = 16;
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                let mut noted = Noted {
                    bound: longest,
                    ..Noted::default()
                };
                let mut joiner = Joiner::default();
                for record in [&bytes[..a], &bytes[a..b], &bytes[b..]] {
                    joiner.feed(record, &mut noted).unwrap();
                    // A header's first bytes, or a payload read, in room for all of it.
                    let (kept, room) = joiner.kept();
                    let read = |n| {
                        let len = |p: &Option<Vec<u8>>| p.as_ref().map(Vec::len);
                        expected.iter().any(|(_, p, _)| len(p) == Some(n))
                    };
                    assert!(kept < longest.max(4), "{a}, {b}: {kept}");
                    assert!(room == 0 || read(room), "{a}, {b}: room for {room}");
                }
                assert!(!joiner.pending(), "{a}, {b}");
                assert_eq!(joiner.kept(), (0, 0));
                assert_eq!(noted.messages.len(), expected.len(), "{a}, {b}");
                for (got, (typ, payload, end)) in noted.messages.iter().zip(&expected) {
                    // The record its last byte is in ends where it does.
                    let record_end = [a, b, bytes.len()]
                        .into_iter()
                        .find(|&e| end - 1 < e)
                        .unwrap();
                    let want = (*typ, payload.clone(), *end == record_end);
                    assert_eq!(got, &want, "split at {a} and {b}");
                }
            }
        }
    }

    /// A message refused at its type or its length keeps nothing of it, even when the record
    /// holds only the first bytes: judged at the first byte, then at the header.
    #[test]
    fn a_refused_message_is_judged_before_it_is_kept() {
        struct Refuses;
        impl Messages for Refuses {
            type Error = Option<usize>;
            fn header(&mut self, typ: u8, len: Option<usize>) -> Result<Keep, Option<usize>> {
                match (typ, len) {
                    (4, Some(len)) if len > 8 => Err(Some(len)),
                    (4, _) => Ok(Keep::Read),
                    _ => Err(len),
                }
            }
            fn message(&mut self, _: u8, _: Option<&[u8]>, _: bool) -> Result<(), Option<usize>> {
                Ok(())
            }
        }
        // A type refused at its first byte.
        assert_eq!(Joiner::default().feed(&[1], &mut Refuses), Err(None));
        assert!(std::mem::size_of::<Joiner>() <= 32);
        // A length refused once the header is whole, over two records.
        let mut joiner = Joiner::default();
        joiner.feed(&[4, 0], &mut Refuses).unwrap();
        assert_eq!(joiner.kept(), (2, 0));
        assert_eq!(joiner.feed(&[0, 9, 1, 2], &mut Refuses), Err(Some(9)));
        assert_eq!(joiner.kept(), (0, 0), "nothing kept of a refused message");
    }
}
