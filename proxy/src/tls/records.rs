//! A TLS 1.3 connection's records once its handshake is done: rustls hands over the traffic
//! secrets (its kernel-connection API, made for kTLS) and keeps only what derives the next
//! ones at a key update (and, as a client, what stores the server's tickets); this module
//! seals and opens the records itself.
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
//!
//! What it does is what rustls does after a TLS 1.3 handshake (RFC 8446 §5), with rustls' own
//! helpers for the nonce and the additional data, and rustls' own bounds:
//! - records: application data only on the wire, at most 2^14 + 256 bytes of ciphertext and
//!   2^14 of plaintext; padding stripped; a record of zeros only refused;
//! - alerts: `close_notify` ends the peer's side, `user_canceled` is ignored, any other
//!   alert (or a malformed one) ends the connection; at most 4 warnings, as rustls;
//! - handshake messages: a `KeyUpdate` at the end of its record (a key change starts at a
//!   record's boundary), answered when the peer asks; as the client, the server's
//!   `NewSessionTicket`s, handed to rustls (which stores them for the next connection's
//!   resumption); every other one refused, as a message split over records is (a `KeyUpdate`
//!   is 5 bytes, and rustls' servers send each ticket in a record of its own: no peer of the
//!   proxy splits one);
//! - bounds against a peer that would make the proxy work for nothing: 32 empty records in
//!   a row, 32 key updates without data between (rustls' `TooManyEmptyFragments`,
//!   `TooManyKeyUpdateRequests`), and 32 tickets without data between (rustls' client takes
//!   any number: this one bounds them as it bounds key updates);
//! - the proxy's own keys are updated before the cipher suite's confidentiality limit (2^24
//!   records for AES-GCM), as rustls does; a sequence number never repeats under one key.
//!
//! TLS 1.2 connections stay on rustls' connection (`TlsStream`): no key updates, another
//! record format, and few devices or gateways.

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};
use rustls::client::ClientConnectionData;
use rustls::crypto::cipher::{Iv, Nonce as TlsNonce, make_tls13_aad};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{AlertDescription, ConnectionTrafficSecrets, ContentType, Error, PeerMisbehaved};

/// A record's header: type, legacy version, length.
const HEADER: usize = 5;
/// The most plaintext a record carries.
const MAX_FRAGMENT: usize = 1 << 14;
/// The most ciphertext a TLS 1.3 record may carry (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
/// The AEAD tag, 16 bytes for every TLS 1.3 suite.
const TAG: usize = 16;
/// What a record adds to its plaintext: the header, the inner content type, the tag.
const OVERHEAD: usize = HEADER + 1 + TAG;
/// A `KeyUpdate` handshake message: type, 24-bit length 1, the request.
const KEY_UPDATE: u8 = 24;
/// A `NewSessionTicket` handshake message's type.
const NEW_SESSION_TICKET: u8 = 4;
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
    /// Takes the payload of a `NewSessionTicket` (its type and length stripped).
    fn ticket(kernel: &mut KernelConnection<Self>, payload: &[u8]) -> Result<(), Fatal>;
}

/// The proxy as a device's server: a client sends no tickets.
impl Side for ServerConnectionData {
    const TAKES_TICKETS: bool = false;
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
    fn ticket(kernel: &mut KernelConnection<Self>, payload: &[u8]) -> Result<(), Fatal> {
        kernel
            .handle_new_session_ticket(payload)
            .map_err(|e| fatal(AlertDescription::DecodeError, e))
    }
}

/// What one record held for the reader.
#[derive(Debug)]
pub(crate) enum Opened {
    /// Application data: the plaintext's range within the record.
    Data(std::ops::Range<usize>),
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

    /// The key for the next record, and its nonce (the sequence number then moves on).
    fn next(&mut self) -> Result<(&LessSafeKey, Nonce), Fatal> {
        let Direction { secrets, seq, key } = self;
        let refused = || fatal(AlertDescription::InternalError, Error::EncryptError);
        let (algorithm, key_bytes, iv) = parts(secrets).ok_or_else(refused)?;
        if *seq >= SEQ_HARD_LIMIT {
            return Err(refused());
        }
        let nonce = Nonce::assume_unique_for_key(TlsNonce::new(iv, *seq).0);
        let key = match key {
            Some(key) => key,
            None => key.insert(
                UnboundKey::new(algorithm, key_bytes)
                    .map(LessSafeKey::new)
                    .map_err(|_| refused())?,
            ),
        };
        *seq += 1;
        Ok((key, nonce))
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

/// The AEAD, key and IV of secrets this module seals (every TLS 1.3 suite rustls' aws-lc
/// provider has); `None` for others.
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
    matches!(
        suite,
        rustls::SupportedCipherSuite::Tls13(suite) if matches!(
            suite.common.suite,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
                | rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        )
    )
}

/// Whether the proxy can take over a connection's records with these secrets.
fn supported(secrets: &ConnectionTrafficSecrets) -> bool {
    parts(secrets).is_some()
}

/// A TLS 1.3 connection's record protection after the handshake; `S`: the proxy's side.
pub(crate) struct Records<S> {
    /// Derives the next traffic secrets at a key update (and, as a client, stores tickets).
    kernel: KernelConnection<S>,
    rx: Direction,
    tx: Direction,
    /// Records sealed under one key, the proxy's `KeyUpdate` the last of them.
    tx_limit: u64,
    /// The peer asked for the proxy's keys to change: answered once, before the next
    /// record the proxy seals (requests that arrive together get one answer, RFC 8446
    /// §4.6.3, as rustls does).
    answer_owed: bool,
    empty_in_a_row: u8,
    key_updates_left: u8,
    tickets_left: u8,
    warnings_left: u8,
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
        let tx_limit = match kernel.negotiated_cipher_suite() {
            rustls::SupportedCipherSuite::Tls13(suite) => suite.common.confidentiality_limit,
            _ => return None,
        };
        Some(Records {
            kernel,
            rx: Direction::new(secrets.rx),
            tx: Direction::new(secrets.tx),
            tx_limit: tx_limit.min(SEQ_SOFT_LIMIT),
            answer_owed: false,
            empty_in_a_row: 0,
            key_updates_left: KEY_UPDATES_WITHOUT_DATA,
            tickets_left: TICKETS_WITHOUT_DATA,
            warnings_left: WARNINGS,
            closed: false,
        })
    }

    /// The session is idle: both AEAD contexts go (rebuilt from the secrets at the next
    /// record).
    pub(crate) fn idle(&mut self) {
        self.rx.key = None;
        self.tx.key = None;
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

    /// Whether either AEAD context is built (for tests).
    #[cfg(test)]
    pub(crate) fn holds_contexts(&self) -> bool {
        self.rx.key.is_some() || self.tx.key.is_some()
    }

    /// The length of the whole record at the front of `data`, once it is all there. Its
    /// header is judged as soon as it is there, as rustls' deframer does: bytes that are not
    /// a TLS 1.3 record are refused at once, not waited on for a length they never meant.
    pub(crate) fn frame(data: &[u8]) -> Result<Option<usize>, Fatal> {
        let Some(header) = data.get(..HEADER) else {
            return Ok(None);
        };
        if header[0] != u8::from(ContentType::ApplicationData) {
            // After the handshake every TLS 1.3 record is opaque application data.
            return Err(fatal(
                AlertDescription::UnexpectedMessage,
                Error::InappropriateMessage {
                    expect_types: vec![ContentType::ApplicationData],
                    got_type: ContentType::from(header[0]),
                },
            ));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_CIPHERTEXT {
            return Err(fatal(AlertDescription::RecordOverflow, Error::DecryptError));
        }
        Ok((data.len() >= HEADER + len).then_some(HEADER + len))
    }

    /// Opens one whole record (as [`Records::frame`] found it), decrypted in place. A key
    /// update the peer asks for is owed from then on ([`Records::answer`]).
    pub(crate) fn open(&mut self, record: &mut [u8]) -> Result<Opened, Fatal> {
        // Framed by the caller (its header judged once, there).
        debug_assert_eq!(
            Self::frame(record).ok().flatten(),
            Some(record.len()),
            "one whole record, as `frame` found it"
        );
        let Some(body) = record.get_mut(HEADER..) else {
            return Err(fatal(AlertDescription::DecodeError, Error::DecryptError));
        };
        if body.len() < TAG {
            return Err(fatal(AlertDescription::BadRecordMac, Error::DecryptError));
        }
        // The header as a TLS 1.3 sender writes it (rustls' own AAD), not as it came: its
        // legacy version is ignored (RFC 8446 §5.1), as rustls ignores it.
        let aad = Aad::from(make_tls13_aad(body.len()));
        let (key, nonce) = self.rx.next()?;
        let plain = key
            .open_in_place(nonce, aad, body)
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
        let typ = ContentType::from(plain[end]);
        let content = &plain[..end];
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
            ContentType::ApplicationData => {
                self.key_updates_left = KEY_UPDATES_WITHOUT_DATA;
                self.tickets_left = TICKETS_WITHOUT_DATA;
                Ok(if content.is_empty() {
                    Opened::Nothing
                } else {
                    Opened::Data(HEADER..HEADER + end)
                })
            }
            ContentType::Alert => self.alert(content),
            ContentType::Handshake => {
                self.handshake(content)?;
                Ok(Opened::Nothing)
            }
            other => Err(fatal(
                AlertDescription::UnexpectedMessage,
                Error::InappropriateMessage {
                    expect_types: vec![
                        ContentType::ApplicationData,
                        ContentType::Alert,
                        ContentType::Handshake,
                    ],
                    got_type: other,
                },
            )),
        }
    }

    /// The handshake messages of one record: whole messages only, a `KeyUpdate` only as the
    /// last.
    fn handshake(&mut self, mut content: &[u8]) -> Result<(), Fatal> {
        while let Some(&typ) = content.first() {
            let whole = match content {
                [_, a, b, c, body @ ..] => {
                    let len = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
                    body.get(..len).map(|payload| (payload, &body[len..]))
                }
                _ => None,
            };
            match (typ, whole) {
                (KEY_UPDATE, Some((&[request], []))) => self.key_update(request)?,
                (KEY_UPDATE, _) => {
                    // Something after it (a key change must end its record), split over
                    // records, or malformed.
                    return Err(fatal(
                        AlertDescription::UnexpectedMessage,
                        PeerMisbehaved::KeyEpochWithPendingFragment,
                    ));
                }
                (NEW_SESSION_TICKET, whole) if S::TAKES_TICKETS => {
                    let Some((payload, rest)) = whole else {
                        // Split over records, or malformed.
                        return Err(fatal(
                            AlertDescription::DecodeError,
                            rustls::InvalidMessage::MessageTooShort,
                        ));
                    };
                    if self.tickets_left == 0 {
                        return Err(fatal(
                            AlertDescription::UnexpectedMessage,
                            Error::General("too many tickets without data between".into()),
                        ));
                    }
                    self.tickets_left -= 1;
                    S::ticket(&mut self.kernel, payload)?;
                    content = rest;
                }
                _ => {
                    return Err(fatal(
                        AlertDescription::UnexpectedMessage,
                        Error::InappropriateHandshakeMessage {
                            expect_types: vec![rustls::HandshakeType::KeyUpdate],
                            got_type: rustls::HandshakeType::from(typ),
                        },
                    ));
                }
            }
            if typ == KEY_UPDATE {
                break;
            }
        }
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
                // TLS 1.3 has no warnings but this one.
                if description == AlertDescription::UserCanceled {
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

    /// The peer's keys changed; it asked for the proxy's to change too when `request` is 1.
    fn key_update(&mut self, request: u8) -> Result<(), Fatal> {
        if self.key_updates_left == 0 {
            return Err(fatal(
                AlertDescription::UnexpectedMessage,
                PeerMisbehaved::TooManyKeyUpdateRequests,
            ));
        }
        self.key_updates_left -= 1;
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
        let next = next_secrets(self.kernel.update_rx_secret())?;
        self.rx.replace(next);
        Ok(())
    }

    /// Seals the answer to the peer's request for new keys, if one is owed, onto `out`.
    pub(crate) fn answer(&mut self, out: &mut Vec<u8>) -> Result<(), Fatal> {
        if std::mem::take(&mut self.answer_owed) && !self.closed {
            self.update_own_keys(out)?;
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
        let next = next_secrets(self.kernel.update_tx_secret())?;
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
    /// spent, or the keys changed without the peer told).
    pub(crate) fn seal(&mut self, data: &[u8], out: &mut [u8]) -> Result<usize, Fatal> {
        let sealed = self.seal_data(data, out);
        if sealed.is_err() {
            self.closed = true;
        }
        sealed
    }

    fn seal_data(&mut self, data: &[u8], out: &mut [u8]) -> Result<usize, Fatal> {
        if self.closed {
            return Err(fatal(AlertDescription::InternalError, Error::EncryptError));
        }
        let mut written = 0;
        for chunk in data.chunks(MAX_FRAGMENT) {
            if self.tx.seq + 1 >= self.tx_limit {
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

    /// Seals this side's `close_notify` onto the end of `out`: the last record sealed.
    pub(crate) fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), Fatal> {
        self.seal_alert(AlertDescription::CloseNotify, out)?;
        self.closed = true;
        Ok(())
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
        let body = content.len() + 1 + TAG;
        let total = HEADER + body;
        let header = make_tls13_aad(body);
        let (key, nonce) = self.tx.next()?;
        let record = &mut out[..total];
        record[..HEADER].copy_from_slice(&header);
        record[HEADER..HEADER + content.len()].copy_from_slice(content);
        record[HEADER + content.len()] = u8::from(typ);
        let (inner, tag) = record[HEADER..].split_at_mut(content.len() + 1);
        let sealed = key
            .seal_in_place_separate_tag(nonce, Aad::from(header), inner)
            .map_err(|_| fatal(AlertDescription::InternalError, Error::EncryptError))?;
        tag.copy_from_slice(sealed.as_ref());
        Ok(total)
    }
}
