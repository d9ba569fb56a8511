//! A TLS connection's records once its handshake is done (TLS 1.3 or 1.2): rustls hands over
//! the traffic secrets (its kernel-connection API, made for kTLS) and keeps only what derives
//! the next ones at a key update (and, as a client, what stores the server's tickets); this
//! module seals and opens the records itself.
//!
//! It sits inside `TlsStream` (`tls/unbuffered.rs`) on both of the proxy's TLS over TCP
//! connections: a device's (the proxy the server), from the moment `terminate` has read what
//! it needs of the handshake, and a gateway's with `[upstream_tls]` (the proxy the client),
//! from the moment the handshake is done (`TlsStream::shed_handshake`), to the connection's
//! end.
//!
//! Why: after the handshake, rustls' connection holds its whole state machine, its buffers
//! and two AEAD contexts (aws-lc's AES-GCM context is 592 bytes, allocated, for each
//! direction) for the connection's life: a third of an idle terminated session
//! (docs/performance.md, "The records without rustls' connection"). Here a direction holds its
//! secret (key and IV, 60 bytes) and its sequence number; its AEAD context is built when a
//! record is sealed or opened and dropped when the session goes idle ([`Records::idle`]).
//! rustls' kernel connection is kept for TLS 1.3 only, whose key updates and tickets need it.
//!
//! What it does is what rustls does after a handshake (RFC 8446 §5; RFC 5246 §6.2.3.3 with
//! RFC 5288's AES-GCM and RFC 7905's ChaCha20-Poly1305 for TLS 1.2), with rustls' own helpers
//! for the nonce and the additional data, and rustls' own bounds:
//! - a record's header judged as its bytes come, as rustls' deframer judges it: its type at
//!   the first byte, its version (any 0x03XX, or one rustls names) at the third, its length
//!   at the fifth (TLS 1.3's own bound of 2^14 + 256 bytes is lower than rustls' deframer's);
//! - records: TLS 1.3's application data only on the wire, at most 2^14 + 256 bytes of
//!   ciphertext and 2^14 of plaintext, padding stripped, a record of zeros only refused; TLS
//!   1.2's typed in the header (data and alerts taken; a handshake message, a request to
//!   renegotiate, declined once with a `no_renegotiation` warning as rustls declines it, ended
//!   the connection after; change_cipher_spec refused), under 2^14 + 2048 bytes of
//!   ciphertext (rustls' bound) and at most 2^14 of plaintext;
//! - alerts: `close_notify` ends the peer's side; TLS 1.3's `user_canceled` and TLS 1.2's
//!   warnings are ignored, at most 4, as rustls; any other alert (or a malformed one) ends
//!   the connection;
//! - TLS 1.3's handshake messages: a `KeyUpdate` at the end of its record (a key change
//!   starts at a record's boundary), answered when the peer asks; as the client, the server's
//!   `NewSessionTicket`s, handed to rustls (which stores them for the next connection's
//!   resumption); every other one refused, and so is a record of none;
//! - handshake messages split over records (TLS 1.3's and TLS 1.2's) joined, as rustls joins
//!   them, with no other record between the parts: each judged by its type at its first byte
//!   and its length at its header, before any of it is kept, so a part of a message this side
//!   never takes (or takes no more of: past a bound) is refused at once; what is held is a
//!   header's first 3 bytes at most, a `KeyUpdate`'s byte, a gateway's ticket's payload (up
//!   to rustls' bound of 2^16 - 1 bytes, in room reserved once), and of a TLS 1.2 request to
//!   renegotiate, declined unread, nothing but a count of the bytes to come
//!   (`tls/joiner.rs`);
//! - bounds against a peer that would make the proxy work for nothing: 32 empty records in
//!   a row, 32 key updates without data between (rustls' `TooManyEmptyFragments`,
//!   `TooManyKeyUpdateRequests`), and 32 tickets without data between (rustls' client takes
//!   any number); only a record of data resets the last two (rustls' own reset at an empty
//!   one too);
//! - the proxy's own keys are updated before the cipher suite's confidentiality limit (2^24
//!   records for AES-GCM), as rustls does; TLS 1.2, which has no key update, ends the
//!   connection there with the proxy's `close_notify`, as rustls does: the write that would
//!   pass the limit is refused whole and no data is sealed after it, and the last sequence
//!   number under the limit is kept for the `close_notify` (rustls seals it at the limit, one
//!   record later); a sequence number never repeats under one key.

use std::ops::Range;

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};
use rustls::client::ClientConnectionData;
use rustls::crypto::cipher::{Iv, Nonce as TlsNonce, make_tls12_aad, make_tls13_aad};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{
    AlertDescription, ConnectionTrafficSecrets, ContentType, Error, PeerMisbehaved, ProtocolVersion,
};

use super::joiner::{Joiner, Keep, Messages};

/// The record layer without a socket, for the fuzz targets.
#[cfg(feature = "model")]
pub mod model;

/// The suites the records seal with an ECDSA certificate, TLS 1.3's and TLS 1.2's (each
/// negotiated alone by the tests and the fuzz target that hold the records to rustls).
#[cfg(any(test, feature = "model"))]
pub const ECDSA_SUITES: [rustls::SupportedCipherSuite; 6] = {
    use rustls::crypto::aws_lc_rs::cipher_suite as suites;
    [
        suites::TLS13_AES_128_GCM_SHA256,
        suites::TLS13_AES_256_GCM_SHA384,
        suites::TLS13_CHACHA20_POLY1305_SHA256,
        suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
};

/// A record's header: type, legacy version, length.
const HEADER: usize = 5;
/// The most plaintext a record carries.
const MAX_FRAGMENT: usize = 1 << 14;
/// The most ciphertext a TLS 1.3 record may carry (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
/// The longest TLS 1.2 record taken: RFC 5246 §6.2.3 allows 2^14 + 2048 bytes of ciphertext,
/// but no record of at most 2^14 bytes of plaintext is that long, and rustls' deframer
/// refuses that length itself.
const MAX_CIPHERTEXT_12: usize = MAX_FRAGMENT + 2048 - 1;
/// The AEAD tag, 16 bytes for every suite sealed here.
const TAG: usize = 16;
/// The explicit part of a TLS 1.2 AES-GCM record's nonce, sent before its ciphertext
/// (RFC 5288 §3).
const EXPLICIT_NONCE: usize = 8;
/// What a record adds to its plaintext, at most: the header, then TLS 1.3's inner content type
/// or TLS 1.2 AES-GCM's explicit nonce, and the tag.
const OVERHEAD: usize = HEADER + EXPLICIT_NONCE + TAG;
/// A `KeyUpdate` handshake message: type, 24-bit length 1, the request.
const KEY_UPDATE: u8 = 24;
/// A `NewSessionTicket` handshake message's type.
const NEW_SESSION_TICKET: u8 = 4;
/// rustls' bound on a handshake message's payload.
const MAX_HANDSHAKE: usize = 0xffff;
/// The fewest records under one key for which one seal (at most four records: `TlsStream`
/// seals 64 KiB at a time) needs one key update at most; every suite's limit is far above.
#[cfg(test)]
const MIN_LIMIT: u64 = 6;
/// rustls' bounds (see the module's notes).
const EMPTY_IN_A_ROW: u8 = 32;
const KEY_UPDATES_WITHOUT_DATA: u8 = 32;
const TICKETS_WITHOUT_DATA: u8 = 32;
const WARNINGS: u8 = 4;
/// rustls' limits on a sequence number: keys are updated at the soft one, and a direction
/// refuses at the hard one.
const SEQ_SOFT_LIMIT: u64 = 0xffff_ffff_ffff_0000;
const SEQ_HARD_LIMIT: u64 = 0xffff_ffff_ffff_fffe;

/// A fatal error: the alert the proxy sends (best effort) and the error it reports.
#[derive(Debug)]
pub(crate) struct Fatal {
    /// `None` after the peer's own fatal alert: nothing is sent back.
    pub(crate) alert: Option<AlertDescription>,
    pub(crate) error: Error,
}

fn fatal(alert: AlertDescription, error: impl Into<Error>) -> Fatal {
    Fatal {
        alert: Some(alert),
        error: error.into(),
    }
}

/// Which side of the connection the proxy is: what the peer may send after the handshake
/// besides a `KeyUpdate`, and what becomes of it.
pub(crate) trait Side: Sized {
    /// Whether the peer may send `NewSessionTicket`s (the proxy is the client).
    const TAKES_TICKETS: bool;
    /// The TLS 1.2 handshake message by which the peer asks to renegotiate: a ClientHello
    /// from a client, a HelloRequest from a server.
    const RENEGOTIATION_REQUEST: u8;
    /// Takes the payload of a `NewSessionTicket` (its type and length stripped).
    fn ticket(kernel: &mut KernelConnection<Self>, payload: &[u8]) -> Result<(), Fatal>;
}

/// The proxy as a device's server: a client sends no tickets.
impl Side for ServerConnectionData {
    const TAKES_TICKETS: bool = false;
    const RENEGOTIATION_REQUEST: u8 = 1;
    fn ticket(_: &mut KernelConnection<Self>, _: &[u8]) -> Result<(), Fatal> {
        Err(fatal(
            AlertDescription::UnexpectedMessage,
            Error::InappropriateHandshakeMessage {
                expect_types: vec![rustls::HandshakeType::KeyUpdate],
                got_type: rustls::HandshakeType::NewSessionTicket,
            },
        ))
    }
}

/// The proxy as a gateway's client: the gateway's tickets are rustls' to store, for the next
/// connection to that gateway to resume.
impl Side for ClientConnectionData {
    const TAKES_TICKETS: bool = true;
    const RENEGOTIATION_REQUEST: u8 = 0;
    fn ticket(kernel: &mut KernelConnection<Self>, payload: &[u8]) -> Result<(), Fatal> {
        kernel
            .handle_new_session_ticket(payload)
            .map_err(|e| fatal(AlertDescription::DecodeError, e))
    }
}

/// What one record held for the reader.
#[derive(Debug)]
enum Opened {
    /// Application data: the plaintext's range within the record.
    Data(Range<usize>),
    /// Nothing for the reader (an empty record, a key update, a `user_canceled`).
    Nothing,
    /// The peer's `close_notify`.
    Closed,
}

/// One direction's keys.
struct Direction {
    secrets: ConnectionTrafficSecrets,
    seq: u64,
    /// Built at the first record after the session was idle.
    key: Option<LessSafeKey>,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Direction {
        Direction {
            secrets,
            seq,
            key: None,
        }
    }

    /// The key for the next record, its sequence number and its nonce's bytes (the IV with
    /// the sequence number mixed in, as TLS 1.3 and TLS 1.2 build it; the sequence number then
    /// moves on). The first four bytes of the IV are TLS 1.2 AES-GCM's salt, which a received
    /// record's explicit nonce follows.
    fn next(&mut self) -> Result<(&LessSafeKey, u64, [u8; 12]), Fatal> {
        let Direction { secrets, seq, key } = self;
        let refused = || fatal(AlertDescription::InternalError, Error::EncryptError);
        let (algorithm, key_bytes, iv) = parts(secrets).ok_or_else(refused)?;
        if *seq >= SEQ_HARD_LIMIT {
            return Err(refused());
        }
        let nonce = TlsNonce::new(iv, *seq).0;
        let this = *seq;
        let key = match key {
            Some(key) => key,
            None => key.insert(
                UnboundKey::new(algorithm, key_bytes)
                    .map(LessSafeKey::new)
                    .map_err(|_| refused())?,
            ),
        };
        *seq += 1;
        Ok((key, this, nonce))
    }

    /// TLS 1.2 AES-GCM's salt: the IV's first four bytes.
    fn salt(&self) -> [u8; 4] {
        let mut salt = [0; 4];
        if let Some((_, _, iv)) = parts(&self.secrets) {
            salt.copy_from_slice(&iv.as_ref()[..4]);
        }
        salt
    }

    /// New secrets (a key update): the context built for the old ones goes.
    fn replace(&mut self, new: (u64, ConnectionTrafficSecrets)) {
        *self = Direction::new(new);
    }
}

/// The next secrets rustls derived at a key update, if this module seals their suite (it
/// does: a key update keeps the suite).
fn next_secrets(
    next: Result<(u64, ConnectionTrafficSecrets), Error>,
) -> Result<(u64, ConnectionTrafficSecrets), Fatal> {
    let next = next.map_err(|e| fatal(AlertDescription::InternalError, e))?;
    if !supported(&next.1) {
        return Err(fatal(AlertDescription::InternalError, Error::EncryptError));
    }
    Ok(next)
}

/// The AEAD, key and IV of secrets this module seals (every suite rustls' aws-lc provider has,
/// TLS 1.3's and TLS 1.2's: for TLS 1.2 AES-GCM the IV is the salt and the key block's explicit
/// part, as rustls hands it over); `None` for others.
fn parts(secrets: &ConnectionTrafficSecrets) -> Option<(&'static Algorithm, &[u8], &Iv)> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => Some((&AES_128_GCM, key.as_ref(), iv)),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => Some((&AES_256_GCM, key.as_ref(), iv)),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            Some((&CHACHA20_POLY1305, key.as_ref(), iv))
        }
        _ => None,
    }
}

/// Whether this module seals `suite` (the same suites as [`parts`], by name: asked before
/// rustls hands the secrets over, which cannot be undone).
pub(crate) fn seals(suite: rustls::SupportedCipherSuite) -> bool {
    use rustls::CipherSuite as S;
    matches!(
        suite.suite(),
        S::TLS13_AES_128_GCM_SHA256
            | S::TLS13_AES_256_GCM_SHA384
            | S::TLS13_CHACHA20_POLY1305_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
            | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
    )
}

/// A record's format.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    /// RFC 8446 §5.2: every record application data on the wire, its real type inside, after
    /// the content and before the padding; the nonce from the sequence number.
    Tls13,
    /// RFC 5246 §6.2.3.3: the type in the header, the additional data the sequence number,
    /// type, version and plaintext length; AES-GCM's nonce partly explicit, sent before the
    /// ciphertext (RFC 5288), ChaCha20-Poly1305's from the sequence number (RFC 7905).
    Tls12 { explicit_nonce: bool },
}

/// Whether the proxy can take over a connection's records with these secrets.
fn supported(secrets: &ConnectionTrafficSecrets) -> bool {
    parts(secrets).is_some()
}

/// A TLS connection's record protection after the handshake; `S`: the proxy's side.
pub(crate) struct Records<S> {
    /// TLS 1.3: derives the next traffic secrets at a key update (and, as a client, stores
    /// tickets). TLS 1.2 has neither, so its connection is not kept: an idle TLS 1.2 session
    /// holds neither its master secret nor the peer's certificate chain, nor the room they
    /// take (boxed: 560 bytes).
    kernel: Option<Box<KernelConnection<S>>>,
    format: Format,
    rx: Direction,
    tx: Direction,
    /// Records sealed under one key, the proxy's `KeyUpdate` the last of them (TLS 1.2, which
    /// has no key update, ends the connection there, its `close_notify` the last of them).
    tx_limit: u64,
    /// TLS 1.2: a write was refused at `tx_limit`; no data is sealed again, alerts still are.
    at_limit: bool,
    /// The peer asked for the proxy's keys to change: answered once, before the next
    /// record the proxy seals (requests that arrive together get one answer, RFC 8446
    /// §4.6.3, as rustls does).
    answer_owed: bool,
    /// TLS 1.2: the peer asked to renegotiate; a `no_renegotiation` warning is owed, as
    /// rustls declines (once: a second request ends the connection).
    decline_owed: bool,
    renegotiations_left: u8,
    empty_in_a_row: u8,
    key_updates_left: u8,
    tickets_left: u8,
    warnings_left: u8,
    /// A handshake message begun in an earlier record, its rest in the records to come.
    joiner: Joiner,
    /// This side's `close_notify` is sealed: nothing more is.
    closed: bool,
}

impl<S: Side> Records<S> {
    /// From what rustls handed over; `None` if the suite is not one this module seals.
    pub(crate) fn new(
        (secrets, kernel): (rustls::ExtractedSecrets, KernelConnection<S>),
    ) -> Option<Records<S>> {
        if !supported(&secrets.rx.1) || !supported(&secrets.tx.1) {
            return None;
        }
        let (format, tx_limit) = match kernel.negotiated_cipher_suite() {
            rustls::SupportedCipherSuite::Tls13(suite) => {
                (Format::Tls13, suite.common.confidentiality_limit)
            }
            rustls::SupportedCipherSuite::Tls12(suite) => {
                let explicit_nonce = !matches!(
                    secrets.tx.1,
                    ConnectionTrafficSecrets::Chacha20Poly1305 { .. }
                );
                (
                    Format::Tls12 { explicit_nonce },
                    suite.common.confidentiality_limit,
                )
            }
        };
        let kernel = (format == Format::Tls13).then(|| Box::new(kernel));
        Some(Records {
            kernel,
            format,
            rx: Direction::new(secrets.rx),
            tx: Direction::new(secrets.tx),
            tx_limit: tx_limit.min(SEQ_SOFT_LIMIT),
            at_limit: false,
            answer_owed: false,
            decline_owed: false,
            renegotiations_left: 1,
            empty_in_a_row: 0,
            key_updates_left: KEY_UPDATES_WITHOUT_DATA,
            tickets_left: TICKETS_WITHOUT_DATA,
            warnings_left: WARNINGS,
            joiner: Joiner::default(),
            closed: false,
        })
    }

    /// The session is idle: both AEAD contexts go (rebuilt from the secrets at the next
    /// record).
    pub(crate) fn idle(&mut self) {
        self.rx.key = None;
        self.tx.key = None;
    }

    /// The TLS version whose records these are (for tests).
    #[cfg(test)]
    pub(crate) fn version(&self) -> ProtocolVersion {
        match self.format {
            Format::Tls13 => ProtocolVersion::TLSv1_3,
            Format::Tls12 { .. } => ProtocolVersion::TLSv1_2,
        }
    }

    /// Whether this side's `close_notify` (or a fatal alert) is sealed.
    pub(crate) fn closed(&self) -> bool {
        self.closed
    }

    /// Seals at most `n` records under one key (for tests: the suite's limit is 2^24).
    #[cfg(test)]
    pub(crate) fn limit_records_per_key(&mut self, n: u64) {
        assert!(n >= MIN_LIMIT, "one seal updates the keys once at most");
        self.tx_limit = n;
    }

    /// Records sealed under the present key (for tests).
    #[cfg(test)]
    pub(crate) fn sealed_under_this_key(&self) -> u64 {
        self.tx.seq
    }

    /// TLS 1.2: whether a write was refused at the suite's limit for one key
    /// ([`Records::seal`]): the connection is to end with this side's `close_notify`.
    pub(crate) fn at_limit(&self) -> bool {
        self.at_limit
    }

    /// A handshake message begun and not ended: the bytes held of it and the room kept for
    /// them (for tests).
    #[cfg(test)]
    pub(crate) fn partial(&self) -> Option<(usize, usize)> {
        self.joiner.pending().then(|| self.joiner.kept())
    }

    /// Whether rustls' kernel connection is kept (for tests).
    #[cfg(test)]
    pub(crate) fn keeps_kernel(&self) -> bool {
        self.kernel.is_some()
    }

    /// Whether either AEAD context is built (for tests).
    #[cfg(test)]
    pub(crate) fn holds_contexts(&self) -> bool {
        self.rx.key.is_some() || self.tx.key.is_some()
    }

    /// The length of the whole record at the front of `data`, once it is all there. Its
    /// header is judged as its bytes come, as rustls' deframer judges it: its type at the
    /// first byte, its version at the third, its length at the fifth; bytes that are not a
    /// record of this connection are refused at once, not waited on for a length they never
    /// meant.
    fn frame(&self, data: &[u8]) -> Result<Option<usize>, Fatal> {
        let Some(&typ) = data.first() else {
            return Ok(None);
        };
        let typ = ContentType::from(typ);
        let (known, max) = match self.format {
            // After the handshake every TLS 1.3 record is opaque application data.
            Format::Tls13 => (typ == ContentType::ApplicationData, MAX_CIPHERTEXT),
            Format::Tls12 { .. } => (
                matches!(
                    typ,
                    ContentType::ApplicationData
                        | ContentType::Alert
                        | ContentType::Handshake
                        | ContentType::ChangeCipherSpec
                ),
                MAX_CIPHERTEXT_12,
            ),
        };
        if !known {
            return Err(fatal(
                AlertDescription::UnexpectedMessage,
                Error::InappropriateMessage {
                    expect_types: vec![ContentType::ApplicationData],
                    got_type: typ,
                },
            ));
        }
        // A version rustls' deframer takes: any 0x03XX, or one it names (SSL 2, DTLS); TLS 1.3
        // ignores the field otherwise (RFC 8446 §5.1), TLS 1.2's tag covers it.
        let Some(&[major, minor]) = data.get(1..3) else {
            return Ok(None);
        };
        if let ProtocolVersion::Unknown(v) =
            ProtocolVersion::from(u16::from_be_bytes([major, minor]))
            && v & 0xff00 != 0x0300
        {
            return Err(fatal(
                AlertDescription::DecodeError,
                rustls::InvalidMessage::UnknownProtocolVersion,
            ));
        }
        let Some(&[high, low]) = data.get(3..HEADER) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([high, low]));
        if len > max {
            // rustls' error for the length its deframer refuses; the alert is RFC 8446's.
            return Err(fatal(
                AlertDescription::RecordOverflow,
                rustls::InvalidMessage::MessageTooLarge,
            ));
        }
        Ok((data.len() >= HEADER + len).then_some(HEADER + len))
    }

    /// Opens the whole records in `data` from `*taken` on, in order, decrypted in place, each
    /// record's data handed to `deliver`; `*taken` moves past each record opened, and stops
    /// before a record that arrived in part or is refused. Returns whether the peer's
    /// `close_notify` was among them: what follows it is not read (taken to the end).
    pub(crate) fn open_all(
        &mut self,
        data: &mut [u8],
        taken: &mut usize,
        mut deliver: impl FnMut(&[u8]),
    ) -> Result<bool, Fatal> {
        loop {
            let rest = &mut data[*taken..];
            let Some(len) = self.frame(rest)? else {
                return Ok(false);
            };
            let record = &mut rest[..len];
            let opened = self.open(record)?;
            *taken += len;
            match opened {
                Opened::Data(range) => deliver(&record[range]),
                Opened::Nothing => {}
                Opened::Closed => {
                    *taken = data.len();
                    return Ok(true);
                }
            }
        }
    }

    /// Opens one whole record (as [`Records::frame`] found it), decrypted in place. A key
    /// update the peer asks for is owed from then on ([`Records::answer`]).
    fn open(&mut self, record: &mut [u8]) -> Result<Opened, Fatal> {
        // Framed by the caller (its header judged once, there).
        debug_assert_eq!(
            self.frame(record).ok().flatten(),
            Some(record.len()),
            "one whole record, as `frame` found it"
        );
        let (typ, content) = match self.format {
            Format::Tls13 => self.open13(record)?,
            Format::Tls12 { explicit_nonce } => self.open12(record, explicit_nonce)?,
        };
        if self.joiner.pending() && typ != ContentType::Handshake {
            // RFC 8446 §5.1: nothing between the parts of a handshake message (rustls refuses
            // it on TLS 1.2 as well). An alert there is answered with none.
            return Err(Fatal {
                alert: (typ != ContentType::Alert).then_some(AlertDescription::UnexpectedMessage),
                error: PeerMisbehaved::MessageInterleavedWithHandshakeMessage.into(),
            });
        }
        if content.is_empty() {
            if self.empty_in_a_row == EMPTY_IN_A_ROW {
                return Err(fatal(
                    AlertDescription::UnexpectedMessage,
                    PeerMisbehaved::TooManyEmptyFragments,
                ));
            }
            self.empty_in_a_row += 1;
        } else {
            self.empty_in_a_row = 0;
        }
        match typ {
            ContentType::ApplicationData if content.is_empty() => Ok(Opened::Nothing),
            ContentType::ApplicationData => {
                // Only data resets the bounds on key updates and tickets (rustls' own resets
                // at an empty record too, so 32 updates, an empty record, 32 more, … would
                // never end).
                self.key_updates_left = KEY_UPDATES_WITHOUT_DATA;
                self.tickets_left = TICKETS_WITHOUT_DATA;
                Ok(Opened::Data(content))
            }
            ContentType::Alert => self.alert(&record[content]),
            ContentType::Handshake => {
                self.handshake(&record[content])?;
                Ok(Opened::Nothing)
            }
            other => Err(fatal(
                AlertDescription::UnexpectedMessage,
                Error::InappropriateMessage {
                    expect_types: vec![ContentType::ApplicationData, ContentType::Alert],
                    got_type: other,
                },
            )),
        }
    }

    /// Opens a TLS 1.3 record: its inner type, and its content's range within `record`.
    fn open13(&mut self, record: &mut [u8]) -> Result<(ContentType, Range<usize>), Fatal> {
        let Some(body) = record.get_mut(HEADER..) else {
            return Err(fatal(AlertDescription::DecodeError, Error::DecryptError));
        };
        if body.len() < TAG {
            return Err(fatal(AlertDescription::BadRecordMac, Error::DecryptError));
        }
        // The header as a TLS 1.3 sender writes it (rustls' own AAD), not as it came: its
        // legacy version is ignored (RFC 8446 §5.1), as rustls ignores it.
        let aad = Aad::from(make_tls13_aad(body.len()));
        let (key, _, nonce) = self.rx.next()?;
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), aad, body)
            .map_err(|_| fatal(AlertDescription::BadRecordMac, Error::DecryptError))?;
        if plain.len() > MAX_FRAGMENT + 1 {
            // Content, type and padding together are bounded as the content is.
            return Err(fatal(
                AlertDescription::RecordOverflow,
                Error::PeerSentOversizedRecord,
            ));
        }
        // The inner content type is the last byte that is not padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(fatal(
                AlertDescription::UnexpectedMessage,
                PeerMisbehaved::IllegalTlsInnerPlaintext,
            ));
        };
        Ok((ContentType::from(plain[end]), HEADER..HEADER + end))
    }

    /// Opens a TLS 1.2 record: its type (the header's, which the tag covers), and its
    /// content's range within `record`.
    fn open12(
        &mut self,
        record: &mut [u8],
        explicit_nonce: bool,
    ) -> Result<(ContentType, Range<usize>), Fatal> {
        let explicit = if explicit_nonce { EXPLICIT_NONCE } else { 0 };
        let Some((header, body)) = record.split_at_mut_checked(HEADER) else {
            return Err(fatal(AlertDescription::DecodeError, Error::DecryptError));
        };
        if body.len() < explicit + TAG {
            return Err(fatal(AlertDescription::BadRecordMac, Error::DecryptError));
        }
        let typ = ContentType::from(header[0]);
        // The version as it came, as rustls takes it: the tag covers it.
        let version = ProtocolVersion::from(u16::from_be_bytes([header[1], header[2]]));
        let len = body.len() - explicit - TAG;
        // AES-GCM's salt, read before the key is borrowed (ChaCha20-Poly1305 has none).
        let salt = explicit_nonce.then(|| self.rx.salt());
        let (key, seq, mut nonce) = self.rx.next()?;
        if let Some(salt) = salt {
            nonce[..4].copy_from_slice(&salt);
            nonce[4..].copy_from_slice(&body[..EXPLICIT_NONCE]);
        }
        let aad = Aad::from(make_tls12_aad(seq, typ, version, len));
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                aad,
                &mut body[explicit..],
            )
            .map_err(|_| fatal(AlertDescription::BadRecordMac, Error::DecryptError))?;
        if plain.len() > MAX_FRAGMENT {
            return Err(fatal(
                AlertDescription::RecordOverflow,
                Error::PeerSentOversizedRecord,
            ));
        }
        let start = HEADER + explicit;
        Ok((typ, start..start + plain.len()))
    }

    /// The handshake messages of one record, joined with what earlier records began
    /// ([`Joiner`]: each judged by its `header` before any of it is kept, then handled by
    /// its `message`, as [`Messages`] says). A record of none is refused (RFC 8446 §5.1: no
    /// zero-length handshake fragments).
    fn handshake(&mut self, content: &[u8]) -> Result<(), Fatal> {
        if content.is_empty() {
            return Err(self.inappropriate(0));
        }
        let mut joiner = std::mem::take(&mut self.joiner);
        let fed = joiner.feed(content, self);
        self.joiner = joiner;
        fed
    }

    /// A handshake message this side never takes after the handshake.
    fn inappropriate(&self, typ: u8) -> Fatal {
        if self.format != Format::Tls13 {
            return fatal(
                AlertDescription::UnexpectedMessage,
                Error::InappropriateMessage {
                    expect_types: vec![ContentType::ApplicationData, ContentType::Alert],
                    got_type: ContentType::Handshake,
                },
            );
        }
        let mut expect_types = vec![rustls::HandshakeType::KeyUpdate];
        if S::TAKES_TICKETS {
            expect_types.push(rustls::HandshakeType::NewSessionTicket);
        }
        fatal(
            AlertDescription::UnexpectedMessage,
            Error::InappropriateHandshakeMessage {
                expect_types,
                got_type: rustls::HandshakeType::from(typ),
            },
        )
    }

    /// TLS 1.2: a handshake message after the handshake is a request to renegotiate, declined
    /// with a warning as rustls declines it: a message of the type this side's peer asks with
    /// (rustls also parses it; this does not, a ClientHello it declines all the same), the
    /// first only (judged at its header: a second one ends the connection).
    fn renegotiation(&mut self) -> Result<(), Fatal> {
        self.renegotiations_left = self.renegotiations_left.saturating_sub(1);
        self.decline_owed = !self.closed;
        Ok(())
    }

    fn alert(&mut self, content: &[u8]) -> Result<Opened, Fatal> {
        let &[level, description] = content else {
            return Err(fatal(
                AlertDescription::DecodeError,
                rustls::InvalidMessage::TrailingData("alert"),
            ));
        };
        let description = AlertDescription::from(description);
        match level {
            1 | 2 if description == AlertDescription::CloseNotify => Ok(Opened::Closed),
            1 => {
                if self.warnings_left == 0 {
                    return Err(fatal(
                        AlertDescription::DecodeError,
                        PeerMisbehaved::TooManyWarningAlertsReceived,
                    ));
                }
                self.warnings_left -= 1;
                // TLS 1.2's warnings are ignored; TLS 1.3 has none but this one.
                if description == AlertDescription::UserCanceled || self.format != Format::Tls13 {
                    Ok(Opened::Nothing)
                } else {
                    Err(fatal(
                        AlertDescription::DecodeError,
                        Error::AlertReceived(description),
                    ))
                }
            }
            2 => Err(Fatal {
                alert: None,
                error: Error::AlertReceived(description),
            }),
            _ => Err(fatal(
                AlertDescription::IllegalParameter,
                Error::AlertReceived(description),
            )),
        }
    }

    /// rustls' connection, kept for TLS 1.3's key updates and tickets only.
    fn kernel(&mut self) -> Result<&mut KernelConnection<S>, Fatal> {
        self.kernel.as_deref_mut().ok_or_else(|| {
            let error = Error::General("no kernel connection (TLS 1.2)".into());
            fatal(AlertDescription::InternalError, error)
        })
    }

    /// The peer's keys changed; it asked for the proxy's to change too when `request` is 1.
    /// (Within the bound on key updates: judged at its header.)
    fn key_update(&mut self, request: u8) -> Result<(), Fatal> {
        self.key_updates_left = self.key_updates_left.saturating_sub(1);
        match request {
            0 => {}
            1 => self.answer_owed = !self.closed,
            _ => {
                return Err(fatal(
                    AlertDescription::IllegalParameter,
                    rustls::InvalidMessage::InvalidKeyUpdate,
                ));
            }
        }
        let next = next_secrets(self.kernel()?.update_rx_secret())?;
        self.rx.replace(next);
        Ok(())
    }

    /// Seals what the peer is owed onto `out`: the answer to its request for new keys (TLS
    /// 1.3), or the warning that declines its request to renegotiate (TLS 1.2).
    pub(crate) fn answer(&mut self, out: &mut Vec<u8>) -> Result<(), Fatal> {
        if std::mem::take(&mut self.answer_owed) && !self.closed {
            self.update_own_keys(out)?;
        }
        // Not at the limit's last record, kept for the `close_notify` that ends TLS 1.2 there.
        if std::mem::take(&mut self.decline_owed) && !self.closed && self.room_for(1) {
            let warning = [1, u8::from(AlertDescription::NoRenegotiation)];
            self.seal_onto(ContentType::Alert, &warning, out)?;
        }
        Ok(())
    }

    /// Seals a `KeyUpdate` (not requesting one back) under the proxy's present keys onto
    /// `out`, then moves to the next ones.
    fn update_own_keys(&mut self, out: &mut Vec<u8>) -> Result<(), Fatal> {
        let updated = self.try_update_own_keys(out);
        if updated.is_err() {
            // Told or not, the peer and the proxy may no longer agree on the keys.
            self.closed = true;
        }
        updated
    }

    fn try_update_own_keys(&mut self, out: &mut Vec<u8>) -> Result<(), Fatal> {
        self.seal_onto(ContentType::Handshake, &[KEY_UPDATE, 0, 0, 1, 0], out)?;
        let next = next_secrets(self.kernel()?.update_tx_secret())?;
        self.tx.replace(next);
        Ok(())
    }

    /// Room [`Records::seal`] needs for `len` bytes of data, at most.
    pub(crate) fn sealed_len(len: usize) -> usize {
        // A key update may go before any record: at most one per seal of up to four records,
        // with at least `MIN_LIMIT` records per key. (An answer the peer asked for is sealed
        // before, by `TlsStream`, through [`Records::answer`].)
        let records = len.div_ceil(MAX_FRAGMENT).max(1);
        OVERHEAD + 5 + len + records * OVERHEAD
    }

    /// Seals `data` as application-data records into `out` (at least
    /// [`Records::sealed_len`] bytes); the bytes written. An empty `data` seals nothing.
    /// A failure closes this side: nothing is sealed again (a sequence number may have been
    /// spent, or the keys changed without the peer told). With one exception: on TLS 1.2,
    /// `data` that would take the records past the suite's limit for one key is refused
    /// whole (nothing of it sealed), and so is all data after it ([`Records::at_limit`]);
    /// alerts are still sealed, for this side's `close_notify` to end the connection there
    /// ([`Records::seal_close_notify`]), as rustls ends it.
    pub(crate) fn seal(&mut self, data: &[u8], out: &mut [u8]) -> Result<usize, Fatal> {
        let sealed = self.seal_data(data, out);
        if sealed.is_err() && !self.at_limit {
            self.closed = true;
        }
        sealed
    }

    /// Whether `records` more fit under the present key, the last sequence number under the
    /// limit left (for a `KeyUpdate` on TLS 1.3, a `close_notify` on TLS 1.2).
    fn room_for(&self, records: u64) -> bool {
        self.tx.seq + records < self.tx_limit
    }

    fn seal_data(&mut self, data: &[u8], out: &mut [u8]) -> Result<usize, Fatal> {
        if self.closed {
            return Err(fatal(AlertDescription::InternalError, Error::EncryptError));
        }
        let records = data.len().div_ceil(MAX_FRAGMENT) as u64;
        if self.format != Format::Tls13 && records > 0 && (self.at_limit || !self.room_for(records))
        {
            // The suite's limit for one key, and TLS 1.2 has no key update: the connection
            // ends there.
            self.at_limit = true;
            return Err(fatal(AlertDescription::CloseNotify, Error::EncryptError));
        }
        let mut written = 0;
        for chunk in data.chunks(MAX_FRAGMENT) {
            if self.format == Format::Tls13 && !self.room_for(1) {
                // The suite's limit for one key: the next ones, as rustls refreshes them.
                let mut update = Vec::new();
                self.update_own_keys(&mut update)?;
                out[written..written + update.len()].copy_from_slice(&update);
                written += update.len();
            }
            written +=
                self.seal_record(ContentType::ApplicationData, chunk, &mut out[written..])?;
        }
        Ok(written)
    }

    /// Seals this side's `close_notify` onto the end of `out`: the last record sealed (or
    /// tried: nothing is sealed after it either way).
    pub(crate) fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), Fatal> {
        let sealed = self.seal_alert(AlertDescription::CloseNotify, out);
        self.closed = true;
        sealed
    }

    /// Seals a fatal alert onto the end of `out` (best effort: nothing if this side is
    /// closed or the keys have run out).
    pub(crate) fn seal_fatal(&mut self, alert: AlertDescription, out: &mut Vec<u8>) {
        if self.seal_alert(alert, out).is_ok() {
            self.closed = true;
        }
    }

    fn seal_alert(&mut self, alert: AlertDescription, out: &mut Vec<u8>) -> Result<(), Fatal> {
        if self.closed {
            return Err(fatal(AlertDescription::InternalError, Error::EncryptError));
        }
        let level = if alert == AlertDescription::CloseNotify {
            1
        } else {
            2
        };
        self.seal_onto(ContentType::Alert, &[level, u8::from(alert)], out)
    }

    /// One record of `typ` carrying `content` (a few bytes) onto the end of `out`.
    fn seal_onto(
        &mut self,
        typ: ContentType,
        content: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Fatal> {
        let start = out.len();
        out.resize(start + OVERHEAD + content.len(), 0);
        match self.seal_record(typ, content, &mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    /// One record of `typ` carrying `content` (at most 2^14 bytes) into the front of `out`.
    fn seal_record(
        &mut self,
        typ: ContentType,
        content: &[u8],
        out: &mut [u8],
    ) -> Result<usize, Fatal> {
        debug_assert!(content.len() <= MAX_FRAGMENT);
        let refused = || fatal(AlertDescription::InternalError, Error::EncryptError);
        // What goes before the content, and what the tag covers besides it.
        let (explicit, inner_type) = match self.format {
            Format::Tls13 => (0, 1),
            Format::Tls12 {
                explicit_nonce: true,
            } => (EXPLICIT_NONCE, 0),
            Format::Tls12 {
                explicit_nonce: false,
            } => (0, 0),
        };
        let body = explicit + content.len() + inner_type + TAG;
        let total = HEADER + body;
        let length = u16::try_from(body).map_err(|_| refused())?.to_be_bytes();
        let (key, seq, nonce) = self.tx.next()?;
        let record = &mut out[..total];
        // TLS 1.3's additional data is its header; TLS 1.2's is 13 bytes of its own.
        let mut aad = [0u8; 13];
        let (header, aad) = match self.format {
            Format::Tls13 => {
                let header = make_tls13_aad(body);
                aad[..HEADER].copy_from_slice(&header);
                (header, &aad[..HEADER])
            }
            Format::Tls12 { .. } => {
                let version = ProtocolVersion::TLSv1_2.to_array();
                let header = [u8::from(typ), version[0], version[1], length[0], length[1]];
                aad = make_tls12_aad(seq, typ, ProtocolVersion::TLSv1_2, content.len());
                (header, &aad[..])
            }
        };
        record[..HEADER].copy_from_slice(&header);
        record[HEADER..HEADER + explicit].copy_from_slice(&nonce[4..4 + explicit]);
        let start = HEADER + explicit;
        record[start..start + content.len()].copy_from_slice(content);
        if inner_type == 1 {
            record[start + content.len()] = u8::from(typ);
        }
        let (inner, tag) = record[start..].split_at_mut(content.len() + inner_type);
        let sealed = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), inner)
            .map_err(|_| refused())?;
        tag.copy_from_slice(sealed.as_ref());
        Ok(total)
    }
}

/// The handshake messages after the handshake, as this side takes them ([`Joiner`]).
impl<S: Side> Messages for Records<S> {
    type Error = Fatal;

    /// Whether a handshake message of `typ`, its payload `len` bytes (once known), is one
    /// this side takes, judged before any of it is kept: a `KeyUpdate` (TLS 1.3), a
    /// `NewSessionTicket` as the client (TLS 1.3, within its bound), a request to renegotiate
    /// (TLS 1.2, the first only); the last two at most rustls' bound on a handshake message.
    fn header(&mut self, typ: u8, len: Option<usize>) -> Result<Keep, Fatal> {
        let bound = match (self.format, typ) {
            (Format::Tls13, KEY_UPDATE) => {
                if self.key_updates_left == 0 {
                    return Err(fatal(
                        AlertDescription::UnexpectedMessage,
                        PeerMisbehaved::TooManyKeyUpdateRequests,
                    ));
                }
                1
            }
            (Format::Tls13, NEW_SESSION_TICKET) if S::TAKES_TICKETS => {
                if self.tickets_left == 0 {
                    return Err(fatal(
                        AlertDescription::UnexpectedMessage,
                        Error::General("too many tickets without data between".into()),
                    ));
                }
                MAX_HANDSHAKE
            }
            (Format::Tls12 { .. }, typ) if typ == S::RENEGOTIATION_REQUEST => {
                if self.renegotiations_left == 0 {
                    return Err(fatal(
                        AlertDescription::UnexpectedMessage,
                        PeerMisbehaved::TooManyRenegotiationRequests,
                    ));
                }
                MAX_HANDSHAKE
            }
            _ => return Err(self.inappropriate(typ)),
        };
        match len {
            Some(0) if typ == KEY_UPDATE => Err(fatal(
                AlertDescription::DecodeError,
                rustls::InvalidMessage::MessageTooShort,
            )),
            Some(len) if typ == KEY_UPDATE && len != bound => Err(fatal(
                AlertDescription::DecodeError,
                rustls::InvalidMessage::TrailingData("KeyUpdate"),
            )),
            Some(len) if len > bound => Err(fatal(
                AlertDescription::DecodeError,
                rustls::InvalidMessage::HandshakePayloadTooLarge,
            )),
            // TLS 1.2's request is declined unread.
            _ if self.format == Format::Tls13 => Ok(Keep::Read),
            _ => Ok(Keep::Skip),
        }
    }

    /// One whole handshake message (its type judged by `header`), `last` if it ends its
    /// record.
    fn message(&mut self, typ: u8, payload: Option<&[u8]>, last: bool) -> Result<(), Fatal> {
        match (self.format, typ, payload) {
            // The last message of its record, as a key change must be (RFC 8446 §5.1).
            (Format::Tls13, KEY_UPDATE, Some(&[request])) if last => self.key_update(request),
            (Format::Tls13, KEY_UPDATE, _) => Err(fatal(
                AlertDescription::UnexpectedMessage,
                PeerMisbehaved::KeyEpochWithPendingFragment,
            )),
            (Format::Tls13, NEW_SESSION_TICKET, Some(payload)) => {
                // Within the bound: judged at its header.
                self.tickets_left = self.tickets_left.saturating_sub(1);
                S::ticket(self.kernel()?, payload)
            }
            (Format::Tls12 { .. }, _, _) => self.renegotiation(),
            (Format::Tls13, typ, _) => Err(self.inappropriate(typ)),
        }
    }
}
