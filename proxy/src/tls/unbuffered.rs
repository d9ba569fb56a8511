//! A device's TLS over TCP, terminated with rustls' unbuffered API: the proxy owns every
//! buffer, so an idle session holds none.
//!
//! Why not `tokio_rustls`: rustls' buffered connection keeps its receive buffer (4 KiB,
//! resized before every read and never freed) for the connection's whole life, the largest
//! single item of an idle terminated session. Here the encrypted bytes are read into a
//! per-thread scratch buffer and decrypted there; a session keeps only a record that arrived
//! in part, decrypted bytes its reader had no room for, or encrypted bytes the socket did not
//! take, each in a buffer freed once empty. The TLS itself (handshake, verification, tickets,
//! key updates, alerts) is rustls' as before; this module only moves bytes. It sits where
//! `tokio-rustls` sat: between the device's socket and the session (`terminate`, `anchor`).
//!
//! Reads and writes of one stream must be polled from one task (as `tokio::io::split`'s
//! halves in one `select!`, or `copy_bidirectional`, do): a read may flush what rustls has to
//! send (a key update's answer), and the socket keeps one write waker.
//!
//! The one thing the unbuffered connection does not tell is the server name the device asked
//! for: [`NotesServerName`] wraps the config's certificate resolver, which rustls calls with
//! every ClientHello, inside `process_tls_records`, on the thread processing it.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The largest TLS record on the wire: a 5-byte header and up to 2^14 + 256 bytes.
const MAX_RECORD: usize = 5 + (1 << 14) + 256;
/// Records read or written per system call, at most: a bulk transfer's writes go out four
/// records to a `write`, as rustls' buffered connection sent its queue with one `writev`.
const RECORDS_PER_CALL: usize = 4;
/// Plaintext encrypted per write: four full records.
const MAX_PLAINTEXT: usize = RECORDS_PER_CALL << 14;
/// The per-thread scratch buffer's size.
const SCRATCH_SIZE: usize = RECORDS_PER_CALL * MAX_RECORD;
/// A handshake may not keep more than this waiting (a client certificate chain fits).
const MAX_PENDING: usize = 64 * 1024 + MAX_RECORD;

thread_local! {
    /// The server name of the ClientHello this thread is processing (see [`NotesServerName`]).
    static SERVER_NAME: RefCell<Option<String>> = const { RefCell::new(None) };
}

thread_local! {
    /// Where encrypted bytes are read and decrypted in place, and records encrypted on their
    /// way to the socket: one per thread, initialised once, so that no session holds one and
    /// no read or write clears one.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_SIZE]);
}

/// Runs `f` with this thread's scratch buffer (a fresh one if it is in use, which the code
/// below never does: it is never held across another use).
fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut vec![0; SCRATCH_SIZE]),
    })
}

/// Reads from `io` into `buf` (never empty: a read of 0 bytes is the end of the stream): the
/// bytes read.
fn read_into(io: &mut TcpStream, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
    debug_assert!(
        !buf.is_empty(),
        "an empty read would read as the end of stream"
    );
    let mut read = ReadBuf::new(buf);
    ready!(Pin::new(io).poll_read(cx, &mut read))?;
    Poll::Ready(Ok(read.filled().len()))
}

/// `config` with its certificate resolver wrapped in [`NotesServerName`]: the config
/// [`TlsStream::accept`] needs.
pub(crate) fn noting_server_names(config: Arc<ServerConfig>) -> Arc<ServerConfig> {
    let mut config = Arc::unwrap_or_clone(config);
    config.cert_resolver = Arc::new(NotesServerName(config.cert_resolver.clone()));
    Arc::new(config)
}

/// A certificate resolver that notes the server name each ClientHello asks for (as rustls
/// validated it), for the handshake this thread is driving to read at once.
#[derive(Debug)]
struct NotesServerName(Arc<dyn ResolvesServerCert>);

impl ResolvesServerCert for NotesServerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(str::to_string);
        SERVER_NAME.with(|n| *n.borrow_mut() = name);
        self.0.resolve(hello)
    }

    fn only_raw_public_keys(&self) -> bool {
        self.0.only_raw_public_keys()
    }
}

/// Runs `f`, a step of a handshake, and keeps the server name rustls' resolver noted
/// during it (cleared first: another connection's handshake on this thread may have left one).
fn noting_name<R>(name: &mut Option<String>, f: impl FnOnce() -> R) -> R {
    SERVER_NAME.with(|n| n.borrow_mut().take());
    let r = f();
    if let Some(noted) = SERVER_NAME.with(|n| n.borrow_mut().take()) {
        *name = Some(noted);
    }
    r
}

/// A terminated device connection: TLS over the device's TCP socket.
pub(crate) struct TlsStream {
    io: TcpStream,
    conn: UnbufferedServerConnection,
    /// Encrypted bytes received but not processed yet (a record that arrived in part).
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet, from `plain_at`.
    plaintext: Vec<u8>,
    plain_at: usize,
    /// Encrypted bytes not written to the socket yet, from `out_at`.
    outgoing: Vec<u8>,
    out_at: usize,
    /// The device sent `close_notify`: no more data after `plaintext`.
    peer_closed: bool,
    /// The device's socket reached its end (without `close_notify`: an error to the reader).
    tcp_eof: bool,
    /// This side's `close_notify` is queued.
    close_sent: bool,
    /// rustls reported an error: its alert is had once (`alert_after_error`), and nothing is
    /// processed again (the bytes that failed would fail again, see there).
    failed: Failed,
}

/// Whether rustls has reported an error, and its alert been had.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Failed {
    No,
    AlertPending,
    AlertTaken,
}

/// rustls' error, noted: its alert is now pending. (Only reached while processing is allowed,
/// so never after the alert was taken.)
fn failed(state: &mut Failed, e: rustls::Error) -> io::Error {
    *state = Failed::AlertPending;
    tls_error(e)
}

/// What to send once rustls allows application data.
enum ToSend<'a> {
    Nothing,
    /// Plaintext to encrypt; how much was taken is set.
    Data(&'a [u8], &'a mut usize),
    /// The `close_notify` alert.
    CloseNotify,
    /// After an error: the alert rustls queued when it met the error, and nothing more
    /// (processing on would meet the bad bytes again, see [`TlsStream::alert_after_error`]).
    Alert,
}

/// What processing the received bytes leaves to do.
enum Next {
    /// Read more from the socket.
    Read,
    /// Write `outgoing` to the socket, then process again.
    Flush,
    /// Both sides sent `close_notify`.
    Closed,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// The device's TLS handshake over `io` with `config` (its resolver wrapped in
    /// [`NotesServerName`]); with the server name the device asked for. The caller bounds it
    /// in time.
    pub(crate) async fn accept(
        config: Arc<ServerConfig>,
        io: TcpStream,
    ) -> io::Result<(TlsStream, Option<String>)> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut tls = TlsStream {
            io,
            conn,
            incoming: Vec::new(),
            plaintext: Vec::new(),
            plain_at: 0,
            outgoing: Vec::new(),
            out_at: 0,
            peer_closed: false,
            tcp_eof: false,
            close_sent: false,
            failed: Failed::No,
        };
        let mut name = None;
        match poll_fn(|cx| tls.poll_handshake(cx, &mut name)).await {
            Ok(()) => Ok((tls, name)),
            Err(e) => {
                // What rustls has to say (its alert) goes out if the socket takes it at once.
                tls.alert_after_error();
                Err(e)
            }
        }
    }

    fn poll_handshake(
        &mut self,
        cx: &mut Context<'_>,
        name: &mut Option<String>,
    ) -> Poll<io::Result<()>> {
        loop {
            match noting_name(name, || self.process(None, ToSend::Nothing))? {
                Next::Flush => ready!(self.poll_flush_outgoing(cx))?,
                Next::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Next::Read if !self.conn.is_handshaking() => {
                    // Done, its last flight and the tickets encoded: they go out now.
                    ready!(self.poll_flush_outgoing(cx))?;
                    return Poll::Ready(Ok(()));
                }
                Next::Read => {
                    if self.tcp_eof {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "tls handshake eof",
                        )));
                    }
                    ready!(noting_name(name, || self.poll_read_tcp(cx, None)))?;
                }
            }
        }
    }

    /// The device's TCP socket.
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.io
    }

    /// The device's certificate chain, as verified.
    pub(crate) fn peer_certificates(
        &self,
    ) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Whether the handshake was a full one or resumed from a ticket.
    pub(crate) fn handshake_kind(&self) -> Option<rustls::HandshakeKind> {
        self.conn.handshake_kind()
    }

    /// Processes what `incoming` holds until something must be read or written (see
    /// [`process_records`]); what is done is dropped from it, and it is freed once empty.
    fn process(&mut self, reader: Option<&mut ReadBuf<'_>>, send: ToSend<'_>) -> io::Result<Next> {
        let mut incoming = std::mem::take(&mut self.incoming);
        let mut taken = 0;
        let next = self.process_records(&mut incoming, &mut taken, reader, send);
        incoming.drain(..taken);
        // An idle session keeps no receive buffer.
        self.incoming = if incoming.is_empty() {
            Vec::new()
        } else {
            incoming
        };
        next
    }

    /// Processes the records in `data` (`incoming`, or bytes just read into the thread's
    /// scratch buffer) until something must be read or written; returns how many of its
    /// bytes are done with. Decrypted bytes go to `reader` while it has room, then to
    /// `plaintext`. `send`: what to send once rustls allows it. `taken` counts the bytes
    /// done with, an error or not.
    fn process_records(
        &mut self,
        data: &mut [u8],
        taken: &mut usize,
        mut reader: Option<&mut ReadBuf<'_>>,
        mut send: ToSend<'_>,
    ) -> io::Result<Next> {
        match (self.failed, &send) {
            (Failed::No, _) | (Failed::AlertPending, ToSend::Alert) => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the TLS connection failed earlier",
                ));
            }
        }
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut data[*taken..]);
            // Done with, even when `state` is an error: rustls processed those bytes.
            *taken += discard;
            let next = match state.map_err(|e| failed(&mut self.failed, e))? {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(|e| failed(&mut self.failed, e))?;
                        *taken += record.discard;
                        let mut payload = record.payload;
                        if let Some(buf) = reader.as_deref_mut()
                            && self.plain_at == self.plaintext.len()
                        {
                            let n = payload.len().min(buf.remaining());
                            buf.put_slice(&payload[..n]);
                            payload = &payload[n..];
                        }
                        if !payload.is_empty() {
                            if self.plain_at == self.plaintext.len() {
                                self.plaintext.clear();
                                self.plain_at = 0;
                            }
                            self.plaintext.extend_from_slice(payload);
                        }
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    // Asked with no room first, to learn the size (an empty chunk fits).
                    match data.encode(&mut []) {
                        Ok(_) => {}
                        Err(EncodeError::InsufficientSize(s)) => {
                            let start = self.outgoing.len();
                            self.outgoing.resize(start + s.required_size, 0);
                            let n = data
                                .encode(&mut self.outgoing[start..])
                                .map_err(|e| io::Error::other(format!("encoding TLS data: {e}")))?;
                            self.outgoing.truncate(start + n);
                        }
                        Err(e) => {
                            return Err(io::Error::other(format!("encoding TLS data: {e}")));
                        }
                    }
                    matches!(send, ToSend::Alert).then_some(Next::Flush)
                }
                ConnectionState::TransmitTlsData(sent) => {
                    if self.out_at == self.outgoing.len() {
                        sent.done();
                        None
                    } else {
                        Some(Next::Flush)
                    }
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    match std::mem::replace(&mut send, ToSend::Nothing) {
                        ToSend::Nothing | ToSend::Alert => {}
                        ToSend::Data(plain, n) => {
                            let plain = &plain[..plain.len().min(MAX_PLAINTEXT)];
                            let waiting = self.out_at < self.outgoing.len();
                            send_encrypted(&self.io, &mut self.outgoing, waiting, |out| {
                                traffic.encrypt(plain, out)
                            })?;
                            *n = plain.len();
                        }
                        ToSend::CloseNotify => {
                            encrypt_into(&mut self.outgoing, |out| {
                                traffic.queue_close_notify(out)
                            })?;
                        }
                    }
                    Some(Next::Read)
                }
                ConnectionState::BlockedHandshake => Some(Next::Read),
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    Some(Next::Closed)
                }
                ConnectionState::ReadEarlyData(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "early data is not accepted",
                    ));
                }
                _ => return Err(io::Error::other("unexpected TLS connection state")),
            };
            if let Some(next) = next {
                return Ok(next);
            }
        }
    }

    /// Reads what the socket has into the thread's scratch buffer, after the part of a
    /// record `incoming` held, and processes it there (decrypted bytes go to `reader` first);
    /// what is left (a record that arrived in part) goes back to `incoming`, sized to fit.
    /// A read takes at most what the reader has room for, plus a record.
    fn poll_read_tcp(
        &mut self,
        cx: &mut Context<'_>,
        reader: Option<&mut ReadBuf<'_>>,
    ) -> Poll<io::Result<()>> {
        if self.incoming.len() > MAX_PENDING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too much TLS data pending",
            )));
        }
        let room = reader
            .as_ref()
            .map_or(MAX_RECORD, |r| r.remaining() + MAX_RECORD);
        // `poll_read`, not `poll_read_ready` and `try_read`: on Linux (epoll) tokio takes a
        // read that fills less than it was given as the socket drained and waits for the next
        // readiness event, where `try_read` leaves the socket marked readable, and the next
        // read finds nothing: a system call for nothing after every read (one per message in
        // terminated sessions, counted with `perf trace`; docs/performance.md, "A read that
        // found nothing after every message").
        with_scratch(|scratch| {
            let held = self.incoming.len();
            if held + MAX_RECORD > scratch.len() {
                // A handshake message larger than the scratch buffer: gathered on the heap.
                let n = ready!(read_into(&mut self.io, cx, &mut scratch[..MAX_RECORD]))?;
                if n == 0 {
                    self.tcp_eof = true;
                } else {
                    self.incoming.extend_from_slice(&scratch[..n]);
                }
                return Poll::Ready(Ok(()));
            }
            let end = (held + room).min(scratch.len());
            let n = ready!(read_into(&mut self.io, cx, &mut scratch[held..end]))?;
            if n == 0 {
                self.tcp_eof = true;
                return Poll::Ready(Ok(()));
            }
            // The part of a record held goes first, as it was: to rustls it is the same
            // buffer, its front discarded.
            scratch[..held].copy_from_slice(&self.incoming);
            let total = held + n;
            let mut taken = 0;
            // What is to be done next (a flush, the close) shows at the next processing:
            // rustls repeats the state until it is handled.
            let processed =
                self.process_records(&mut scratch[..total], &mut taken, reader, ToSend::Nothing);
            self.incoming = scratch[taken..total].to_vec();
            Poll::Ready(processed.map(drop))
        })
    }

    /// After an error, what rustls has to say (its alert) goes out if the socket takes it at
    /// once: best effort, as `tokio-rustls` does. rustls queued the alert when it met the
    /// error and hands it out before it looks at the bytes again; processing stops there.
    /// Past it, bytes that failed to deframe (not TLS) would fail again and make rustls send
    /// a second fatal alert, which it asserts against (a panic in debug builds, on a peer's
    /// bytes; rustls/rustls#959). The bytes stay: rustls' handshake deframer points into them.
    ///
    /// It stops after the first chunk rustls hands out: the proxy encodes every chunk as soon
    /// as rustls hands it out, so at an error the alert (queued last) is the only one waiting.
    /// Once only: a second call (a read failing again) would find no alert and process on.
    fn alert_after_error(&mut self) {
        if self.failed != Failed::AlertPending {
            return;
        }
        let _ = self.process(None, ToSend::Alert);
        self.failed = Failed::AlertTaken;
        let _ = self.io.try_write(&self.outgoing[self.out_at..]);
    }

    /// Writes `outgoing` to the socket; frees it once all is written.
    fn poll_flush_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.outgoing = Vec::new();
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Hands over decrypted bytes waiting in `plaintext`.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let waiting = &self.plaintext[self.plain_at..];
        if waiting.is_empty() {
            return false;
        }
        let n = waiting.len().min(buf.remaining());
        buf.put_slice(&waiting[..n]);
        self.plain_at += n;
        if self.plain_at == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plain_at = 0;
        }
        true
    }
}

/// Encrypts with `encrypt` into the thread's scratch buffer and writes the record to the
/// socket at once; what the socket does not take waits in `outgoing` (as does all of it
/// when something already waits there, to keep the order).
fn send_encrypted(
    io: &TcpStream,
    outgoing: &mut Vec<u8>,
    waiting: bool,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> io::Result<()> {
    if waiting {
        return encrypt_into(outgoing, encrypt);
    }
    with_scratch(|scratch| {
        let n = match encrypt(scratch) {
            Ok(n) => n,
            Err(EncryptError::InsufficientSize(_)) => {
                return encrypt_into(outgoing, &mut encrypt);
            }
            Err(e) => return Err(io::Error::other(format!("encrypting TLS data: {e}"))),
        };
        let written = match io.try_write(&scratch[..n]) {
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if written < n {
            outgoing.extend_from_slice(&scratch[written..n]);
        }
        Ok(())
    })
}

/// Encrypts with `f` into the end of `out`, growing it to the size rustls asks for.
fn encrypt_into(
    out: &mut Vec<u8>,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = MAX_RECORD;
    loop {
        out.resize(start + room, 0);
        match f(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(s)) if s.required_size > room => {
                room = s.required_size;
            }
            Err(e) => {
                out.truncate(start);
                return Err(io::Error::other(format!("encrypting TLS data: {e}")));
            }
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = this.poll_read_records(cx, buf);
        if let Poll::Ready(Err(e)) = &read
            && e.kind() == io::ErrorKind::InvalidData
        {
            this.alert_after_error();
        }
        read
    }
}

impl TlsStream {
    fn poll_read_records(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.take_plaintext(buf) || self.peer_closed {
                return Poll::Ready(Ok(()));
            }
            let next = self.process(Some(buf), ToSend::Nothing)?;
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            match next {
                Next::Flush => {
                    // Key updates and the like are answered before reading on.
                    ready!(self.poll_flush_outgoing(cx))?;
                    continue;
                }
                Next::Closed => continue,
                Next::Read => {}
            }
            if self.plain_at < self.plaintext.len() || self.peer_closed {
                continue;
            }
            if self.tcp_eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            ready!(self.poll_read_tcp(cx, Some(buf)))?;
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What an earlier write left goes first: the socket decides the pace.
        ready!(this.poll_flush_outgoing(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            let mut taken = 0;
            match this.process(None, ToSend::Data(data, &mut taken))? {
                Next::Flush => {
                    ready!(this.poll_flush_outgoing(cx))?;
                    continue;
                }
                Next::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Next::Read => {}
            }
            if taken == 0 {
                return Poll::Ready(Err(io::Error::other(
                    "TLS connection cannot send application data",
                )));
            }
            // Written as far as the socket takes it now; the rest at the next write or flush.
            if let Poll::Ready(Err(e)) = this.poll_flush_outgoing(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(taken));
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_outgoing(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !this.close_sent {
            ready!(this.poll_flush_outgoing(cx))?;
            // What rustls has queued goes first (a key update's answer, an alert), then the
            // `close_notify` where the connection can still send; best effort, as rustls' own.
            match this.process(None, ToSend::CloseNotify) {
                Ok(Next::Flush) => continue,
                Ok(_) | Err(_) => this.close_sent = true,
            }
        }
        ready!(this.poll_flush_outgoing(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use wasmbed_certs::pki::{DevCa, KeyKind};

    use super::TlsStream;

    type Client = tokio_rustls::client::TlsStream<TcpStream>;

    /// Copies `from` to `to` one byte per write, so that every record arrives in pieces.
    async fn dribble(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) {
        let mut byte = [0u8; 1];
        while let Ok(1) = from.read(&mut byte).await {
            if to.write_all(&byte).await.is_err() || to.flush().await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    /// The proxy's config (device certificates from its CA required) and a device's, whose
    /// certificate comes from that CA when `trusted`, from another one otherwise.
    fn configs(trusted: bool) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let ca = DevCa::generate("test CA").unwrap();
        let other = DevCa::generate("another CA").unwrap();
        let server = ca
            .issue_server(&["device.test"], KeyKind::EcdsaP256)
            .unwrap();
        let device = if trusted { &ca } else { &other }
            .issue_client("device-1", KeyKind::EcdsaP256)
            .unwrap();
        let server = wasmbed_certs::server_config(
            server.chain(),
            server.key().unwrap(),
            Some(&[ca.cert_der()]),
            &[],
        )
        .unwrap();
        let client = wasmbed_certs::client_config(
            &[ca.cert_der()],
            Some((device.chain(), device.key().unwrap())),
        )
        .unwrap();
        (super::noting_server_names(server), client)
    }

    /// A device (rustls' client, with a certificate) and the proxy's end of its connection;
    /// `dribbled`: through a relay that passes one byte at a time.
    async fn pair(dribbled: bool) -> (Client, TlsStream) {
        let (config, client) = configs(true);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut addr = listener.local_addr().unwrap();
        if dribbled {
            let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let target = addr;
            addr = relay.local_addr().unwrap();
            tokio::spawn(async move {
                let (from_client, _) = relay.accept().await.unwrap();
                let to_server = TcpStream::connect(target).await.unwrap();
                let (cr, cw) = from_client.into_split();
                let (sr, sw) = to_server.into_split();
                tokio::join!(dribble(cr, sw), dribble(sr, cw));
            });
        }
        let connector = tokio_rustls::TlsConnector::from(client);
        tokio::join!(
            async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("device.test").unwrap();
                connector.connect(name, tcp).await.unwrap()
            },
            async {
                let (tcp, _) = listener.accept().await.unwrap();
                let (tls, name) = TlsStream::accept(Arc::clone(&config), tcp).await.unwrap();
                assert_eq!(name.as_deref(), Some("device.test"));
                tls
            },
        )
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    async fn bytes_cross_both_ways(dribbled: bool) {
        let (mut client, mut server) = pair(dribbled).await;
        assert_eq!(server.peer_certificates().map(<[_]>::len), Some(1));
        let size = if dribbled { 20_000 } else { 200_000 };
        let up = pattern(size, 1);
        let down = pattern(size, 2);
        let ((), got_up) = tokio::join!(async { client.write_all(&up).await.unwrap() }, async {
            let mut got = vec![0u8; size];
            server.read_exact(&mut got).await.unwrap();
            got
        });
        assert!(got_up == up, "the device's bytes arrived changed");
        let ((), got_down) = tokio::join!(
            async {
                server.write_all(&down).await.unwrap();
                server.flush().await.unwrap();
            },
            async {
                let mut got = vec![0u8; size];
                client.read_exact(&mut got).await.unwrap();
                got
            }
        );
        assert!(got_down == down, "the proxy's bytes arrived changed");
        // An idle session keeps no buffer of its own.
        assert_eq!(
            (
                server.incoming.capacity(),
                server.plaintext.capacity(),
                server.outgoing.capacity()
            ),
            (0, 0, 0)
        );
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_an_idle_stream_keeps_no_buffer() {
        bytes_cross_both_ways(false).await;
    }

    #[tokio::test]
    async fn records_that_arrive_a_byte_at_a_time_are_read_whole() {
        bytes_cross_both_ways(true).await;
    }

    /// A read that took all the socket had leaves the socket waiting for its next readiness
    /// event, so the next read makes no system call that finds nothing (with `try_read` it
    /// stayed marked readable: one such call after every message).
    #[tokio::test]
    async fn a_read_that_drains_the_socket_waits_for_the_next_readiness() {
        let (mut client, mut server) = pair(false).await;
        client.write_all(b"hello").await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        let ready = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(server.io.poll_read_ready(cx).is_ready())
        })
        .await;
        assert!(
            !ready,
            "the socket is still marked readable after a draining read"
        );
        // Not ready for a reason of its own (a spent budget, a closed socket): the next bytes
        // make it readable, and they are read.
        client.write_all(b"again").await.unwrap();
        client.flush().await.unwrap();
        server.io.readable().await.unwrap();
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"again");
    }

    #[tokio::test]
    async fn a_key_update_is_answered_and_bytes_flow_on() {
        let (mut client, mut server) = pair(false).await;
        client.write_all(b"before").await.unwrap();
        let mut got = [0u8; 6];
        server.read_exact(&mut got).await.unwrap();
        client.get_mut().1.refresh_traffic_keys().unwrap();
        client.write_all(b"after!").await.unwrap();
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after!");
        server.write_all(b"answer").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"answer");
    }

    #[tokio::test]
    async fn after_a_key_update_the_proxys_close_still_sends_close_notify() {
        let (mut client, mut server) = pair(false).await;
        // Data, then a key update: the proxy owes the device its own key update.
        client.write_all(b"x").await.unwrap();
        client.get_mut().1.refresh_traffic_keys().unwrap();
        client.flush().await.unwrap();
        let mut got = [0u8; 1];
        server.read_exact(&mut got).await.unwrap();
        // The close sends the answer, then the alert.
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    /// What `device` gets from the proxy's end, accepting with `config` on a listener of its
    /// own; and how the proxy's accept ended.
    async fn against_the_proxy<T>(
        config: Arc<rustls::ServerConfig>,
        device: impl AsyncFnOnce(TcpStream) -> T,
    ) -> (T, std::io::Result<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::join!(
            async { device(TcpStream::connect(addr).await.unwrap()).await },
            async {
                let (tcp, _) = listener.accept().await.unwrap();
                TlsStream::accept(config, tcp).await.map(|_| ())
            },
        )
    }

    #[tokio::test]
    async fn a_refused_certificate_gets_its_alert() {
        let (config, client) = configs(false);
        let (device, proxy) = against_the_proxy(config, async |tcp| {
            let name = rustls::pki_types::ServerName::try_from("device.test").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(name, tcp)
                .await?;
            // TLS 1.3: the client's handshake ends before the server judges its
            // certificate; the verdict arrives as an alert on the first read.
            tls.read(&mut [0u8; 1]).await
        })
        .await;
        let refused = proxy.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidData, "{refused}");
        let told = device.unwrap_err().to_string();
        assert!(
            told.contains("alert"),
            "the device was not told why: {told}"
        );
    }

    /// Bytes that are not TLS (a deframing error, met before any handshake state): refused,
    /// and the client gets one fatal `decode_error` alert, then the end of the stream. (The
    /// alert used to be had by processing the bad bytes again, which failed again: a second
    /// fatal alert, which rustls asserts against, a panic in debug builds.)
    #[tokio::test]
    async fn bytes_that_are_not_tls_get_one_alert() {
        let (config, _) = configs(true);
        let (told, refused) = against_the_proxy(config, async |mut tcp| {
            tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut told = Vec::new();
            let _ = tcp.read_to_end(&mut told).await;
            told
        })
        .await;
        let refused = refused.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidData, "{refused}");
        // A plaintext alert record: type 21, TLS 1.2 framing, 2 bytes: fatal (2),
        // decode_error (50).
        assert_eq!(told, [21, 3, 3, 0, 2, 2, 50]);
    }

    /// A device's real first flight with a few bytes changed, hundreds of times (a fixed
    /// sequence): every handshake ends, refused, and nothing panics. rustls' debug
    /// assertions are on in tests, so this also checks that the stream never makes rustls
    /// send a second fatal alert (it did, for bytes that failed to deframe: this test panics
    /// without the fix).
    #[tokio::test]
    async fn mutated_first_flights_end_without_a_panic() {
        let (config, client) = configs(true);
        let name = rustls::pki_types::ServerName::try_from("device.test").unwrap();
        let mut device = rustls::ClientConnection::new(client, name).unwrap();
        let mut flight = Vec::new();
        device.write_tls(&mut flight).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut refused = 0;
        for _ in 0..300 {
            let mut bytes = flight.clone();
            for _ in 0..1 + next() % 8 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            let ended = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                against_the_proxy(config.clone(), async |mut tcp| {
                    let _ = tcp.write_all(&bytes).await;
                    let _ = tcp.shutdown().await;
                    let _ = tcp.read_to_end(&mut Vec::new()).await;
                }),
            )
            .await;
            let ((), accepted) = ended.expect("a handshake that never ends");
            refused += usize::from(accepted.is_err());
        }
        // The device never sends its second flight: no handshake can finish.
        assert_eq!(refused, 300);
    }

    /// A record that is not TLS after the handshake: the read fails (with rustls' alert), and
    /// the stream's later write fails and its close ends it, neither processing those bytes
    /// again (they would fail again, and rustls' second fatal alert is a panic in debug
    /// builds).
    #[tokio::test]
    async fn after_a_bad_record_nothing_processes_it_again() {
        let (mut client, mut server) = pair(false).await;
        client
            .get_mut()
            .0
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let read = server.read(&mut [0u8; 64]).await.unwrap_err();
        assert_eq!(read.kind(), std::io::ErrorKind::InvalidData, "{read}");
        let write = server.write_all(b"late").await.unwrap_err();
        assert_eq!(write.kind(), std::io::ErrorKind::InvalidData, "{write}");
        let _ = server.shutdown().await;
        drop(server);
        // The device's side ends (what came before the end: tickets, the encrypted alert).
        let _ = client.get_mut().0.read_to_end(&mut Vec::new()).await;
    }

    #[tokio::test]
    async fn close_notify_ends_the_stream_and_a_bare_fin_is_an_error() {
        let (mut client, mut server) = pair(false).await;
        client.write_all(b"last").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last");
        // The proxy's close: the device reads its end of stream.
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());

        let (mut client, mut server) = pair(false).await;
        client.get_mut().0.shutdown().await.unwrap();
        let e = server.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
