//! TLS over TCP on rustls' unbuffered API, for both of the proxy's sides: a device's
//! connection (the proxy the server, [`TlsStream::accept`]) and the proxy's own to a gateway
//! (`[upstream_tls]`, the proxy the client, [`TlsStream::connect`]). The proxy owns every
//! buffer, so an idle session holds none.
//!
//! Why not `tokio_rustls`: rustls' buffered connection keeps its receive buffer (4 KiB,
//! resized before every read and never freed) for the connection's whole life, the largest
//! single item of an idle terminated session. Here the encrypted bytes are read into a
//! per-thread scratch buffer and decrypted there; a session keeps only a record that arrived
//! in part, decrypted bytes its reader had no room for, or encrypted bytes the socket did not
//! take, each in a buffer freed once empty. The TLS itself (handshake, verification, tickets,
//! key derivation) is rustls'; the records are rustls' through the handshake and
//! [`super::records`]' once it is shed (below); this module
//! moves the bytes. It sits where `tokio-rustls` sat: between the device's socket and the
//! session (`terminate`, `anchor`), and between the session and a gateway's socket
//! (`upstream::over_tcp`).
//!
//! Reads and writes of one stream must be polled from one task (as `tokio::io::split`'s
//! halves in one `select!`, or `copy_bidirectional`, do): a read may flush what rustls has to
//! send (a key update's answer), and the socket keeps one write waker.
//!
//! Once a handshake (TLS 1.3 or 1.2) is done and the session has read what it needs from it
//! (the certificate chain, whether it resumed), [`TlsStream::shed_handshake`] hands the
//! records to [`super::records`]: rustls' connection, its state and both AEAD contexts go,
//! and an idle session keeps only the traffic secrets.
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

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedConnectionCommon,
    UnbufferedStatus,
};
use rustls::{ClientConfig, ExtractedSecrets, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::records::{self, Records};

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

/// `config` with its certificate resolver wrapped in [`NotesServerName`], and rustls' secrets
/// handed over after the handshake ([`TlsStream::shed_handshake`]): the config
/// [`TlsStream::accept`] needs.
pub(crate) fn noting_server_names(config: Arc<ServerConfig>) -> Arc<ServerConfig> {
    let mut config = Arc::unwrap_or_clone(config);
    config.cert_resolver = Arc::new(NotesServerName(config.cert_resolver.clone()));
    config.enable_secret_extraction = true;
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

/// rustls' unbuffered connection of either side: the proxy as a device's server, or as a
/// gateway's client (`[upstream_tls]`). The two differ only in types: rustls gives each side
/// its own `process_tls_records` and hand-over.
pub(crate) trait RustlsSide:
    std::ops::DerefMut<Target = UnbufferedConnectionCommon<Self::Side>> + Send + Sized
{
    /// rustls' side data, and what [`records`] does with what that side's peer may send.
    type Side: records::Side + Send;

    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Side>;

    fn into_kernel(self)
    -> Result<(ExtractedSecrets, KernelConnection<Self::Side>), rustls::Error>;
}

/// The two sides' impls: each calls its own connection's inherent methods of these names.
macro_rules! rustls_side {
    ($conn:ty, $side:ty) => {
        impl RustlsSide for $conn {
            type Side = $side;

            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Side> {
                self.process_tls_records(incoming)
            }

            fn into_kernel(
                self,
            ) -> Result<(ExtractedSecrets, KernelConnection<Self::Side>), rustls::Error> {
                self.dangerous_into_kernel_connection()
            }
        }
    };
}

rustls_side!(UnbufferedServerConnection, ServerConnectionData);
rustls_side!(UnbufferedClientConnection, ClientConnectionData);

/// A TLS connection over TCP the proxy terminates: a device's (`TlsStream`, the proxy the
/// server), or the proxy's own to a gateway (`TlsStream<UnbufferedClientConnection>`, the
/// proxy the client; [`TlsStream::connect`]).
pub(crate) struct TlsStream<C: RustlsSide = UnbufferedServerConnection> {
    io: TcpStream,
    conn: Conn<C>,
    /// Encrypted bytes received but not processed yet (a record that arrived in part).
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet, from `plain_at`.
    plaintext: Vec<u8>,
    plain_at: usize,
    /// Encrypted bytes not written to the socket yet, from `out_at`.
    outgoing: Vec<u8>,
    out_at: usize,
    /// The peer sent `close_notify`: no more data after `plaintext`.
    peer_closed: bool,
    /// The peer's socket reached its end (without `close_notify`: an error to the reader).
    tcp_eof: bool,
    /// This side's `close_notify` is queued.
    close_sent: bool,
    /// rustls reported an error: its alert is had once (`alert_after_error`), and nothing is
    /// processed again (the bytes that failed would fail again, see there).
    failed: Failed,
    /// While the handshake runs: how many bytes of `incoming` (from its front) rustls has been
    /// given. It gets them a record at a time and none once its side of the handshake is done
    /// (a device's Finished received; as a client, the gateway's Finished), so that
    /// what follows the handshake (data, a key update) is still unread when the handshake is
    /// shed: rustls would answer a key update only with its next data, an answer the shed
    /// would lose ([`TlsStream::shed_handshake`]). `None` once the handshake is done.
    fed: Option<u32>,
}

/// Who protects the records.
enum Conn<C: RustlsSide> {
    /// rustls' connection: the handshake (and a suite the records do not seal, throughout).
    Rustls(Box<C>),
    /// After the handshake: the records alone ([`TlsStream::shed_handshake`]).
    Records(Box<Records<C::Side>>),
    /// The hand-over failed: nothing is processed again.
    Gone,
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
        let mut name = None;
        let tls = TlsStream::handshake(conn, io, &mut name).await?;
        Ok((tls, name))
    }
}

impl TlsStream<UnbufferedClientConnection> {
    /// The proxy's TLS handshake with a gateway over `io`, `name` its certificate's expected
    /// name (`[upstream_tls]`). The caller bounds it in time.
    pub(crate) async fn connect(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        io: TcpStream,
    ) -> io::Result<TlsStream<UnbufferedClientConnection>> {
        let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
        TlsStream::handshake(conn, io, &mut None).await
    }
}

impl<C: RustlsSide> TlsStream<C> {
    /// Runs `conn`'s handshake over `io` (`name`: the server name a device asked for, noted
    /// by [`NotesServerName`] on the server's side).
    async fn handshake(conn: C, io: TcpStream, name: &mut Option<String>) -> io::Result<Self> {
        let mut tls = TlsStream {
            io,
            conn: Conn::Rustls(Box::new(conn)),
            incoming: Vec::new(),
            plaintext: Vec::new(),
            plain_at: 0,
            outgoing: Vec::new(),
            out_at: 0,
            peer_closed: false,
            tcp_eof: false,
            close_sent: false,
            failed: Failed::No,
            fed: Some(0),
        };
        match poll_fn(|cx| tls.poll_handshake(cx, name)).await {
            Ok(()) => {
                // What follows the Finished is read as rustls' or as `records`' from here.
                tls.fed = None;
                Ok(tls)
            }
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
                Next::Read if matches!(&self.conn, Conn::Rustls(c) if !c.is_handshaking()) => {
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

    /// The connection's TCP socket.
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.io
    }

    /// The peer's certificate chain, as verified (`None` once the handshake is shed).
    pub(crate) fn peer_certificates(
        &self,
    ) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        match &self.conn {
            Conn::Rustls(conn) => conn.peer_certificates(),
            _ => None,
        }
    }

    /// Whether the handshake was a full one or resumed from a ticket (`None` once the
    /// handshake is shed).
    pub(crate) fn handshake_kind(&self) -> Option<rustls::HandshakeKind> {
        match &self.conn {
            Conn::Rustls(conn) => conn.handshake_kind(),
            _ => None,
        }
    }

    /// After the handshake (TLS 1.3 or 1.2), once the session has read what it needs of it
    /// (the certificate chain, whether it resumed): rustls hands over the traffic secrets and
    /// the records are sealed and opened by [`records`] from here on; rustls' connection, its
    /// state and its two AEAD contexts are freed. The records' format and what a peer must do
    /// do not change (an alert may name another description than rustls' would, and a key
    /// update is answered at once, where rustls answers with its next data). A cipher suite
    /// [`records`] does not seal, or a connection that failed, stay as they are. An error
    /// (rustls refused to hand over: the config does not allow it, or it still had records to
    /// send) ends the connection, counted as the proxy's own failure (`internal`).
    pub(crate) fn shed_handshake(&mut self) -> io::Result<()> {
        let Conn::Rustls(conn) = &self.conn else {
            return Ok(());
        };
        let sealable = conn.negotiated_cipher_suite().is_some_and(records::seals);
        if conn.is_handshaking() || !sealable || self.failed != Failed::No {
            return Ok(());
        }
        let Conn::Rustls(conn) = std::mem::replace(&mut self.conn, Conn::Gone) else {
            unreachable!("matched above");
        };
        let records = conn.into_kernel().map_err(tls_error).and_then(|handed| {
            Records::new(handed)
                .ok_or_else(|| io::Error::other("TLS secrets of an unexpected cipher suite"))
        })?;
        self.conn = Conn::Records(Box::new(records));
        Ok(())
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
        let conn = match &mut self.conn {
            Conn::Rustls(conn) => conn,
            Conn::Records(_) => return self.open_records(data, taken, reader, send),
            Conn::Gone => {
                return Err(io::Error::other("the TLS connection was not handed over"));
            }
        };
        loop {
            let before = *taken;
            let rest = data.len() - *taken;
            let limit = match self.fed {
                None => rest,
                Some(fed) if conn.is_handshaking() => {
                    next_record_end(&data[*taken..], fed as usize)
                }
                // The Finished is processed: nothing more until the handshake is shed.
                Some(fed) => (fed as usize).min(rest),
            };
            let UnbufferedStatus { discard, state } =
                conn.process(&mut data[*taken..*taken + limit]);
            // Done with, even when `state` is an error: rustls processed those bytes.
            *taken += discard;
            let next = match state.map_err(|e| failed(&mut self.failed, e))? {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(|e| failed(&mut self.failed, e))?;
                        *taken += record.discard;
                        deliver(
                            (&mut self.plaintext, &mut self.plain_at),
                            reader.as_deref_mut(),
                            record.payload,
                        );
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
            if let Some(fed) = &mut self.fed {
                let seen = limit.saturating_sub(*taken - before);
                // Within `MAX_PENDING` and a read: far below `u32::MAX`.
                *fed = u32::try_from(seen).unwrap_or(u32::MAX);
                if matches!(next, Some(Next::Read))
                    && conn.is_handshaking()
                    && seen < data.len() - *taken
                {
                    // More of what was read is there to give before reading again.
                    continue;
                }
            }
            if let Some(next) = next {
                return Ok(next);
            }
        }
    }

    /// [`TlsStream::process_records`] once the records are [`records`]'s: the whole records
    /// in `data` are opened (decrypted bytes to `reader`, then `plaintext`; a key update's
    /// answer sealed onto `outgoing`), then `send` sealed. Returns `Flush` while an answer
    /// waits and nothing is sent.
    fn open_records(
        &mut self,
        data: &mut [u8],
        taken: &mut usize,
        mut reader: Option<&mut ReadBuf<'_>>,
        send: ToSend<'_>,
    ) -> io::Result<Next> {
        let Conn::Records(records) = &mut self.conn else {
            unreachable!("called for `Conn::Records` only");
        };
        if let ToSend::Alert = send {
            // Sealed onto `outgoing` when the error was met.
            return Ok(Next::Flush);
        }
        let mut fail =
            |records: &mut Records<C::Side>, outgoing: &mut Vec<u8>, f: records::Fatal| {
                if let Some(alert) = f.alert {
                    records.seal_fatal(alert, outgoing);
                }
                failed(&mut self.failed, f.error)
            };
        if !self.peer_closed {
            let (plaintext, plain_at) = (&mut self.plaintext, &mut self.plain_at);
            let opened = records.open_all(data, taken, |plain| {
                deliver((plaintext, plain_at), reader.as_deref_mut(), plain);
            });
            match opened {
                Ok(closed) => self.peer_closed = closed,
                Err(f) => return Err(fail(records, &mut self.outgoing, f)),
            }
        }
        if self.peer_closed {
            // What follows the peer's `close_notify` is not read.
            *taken = data.len();
        }
        // The peer asked for new keys: one answer for all it asked, before anything else.
        if let Err(f) = records.answer(&mut self.outgoing) {
            return Err(fail(records, &mut self.outgoing, f));
        }
        match send {
            ToSend::Data(plain, n) => {
                let sealed = seal_and_send(
                    records,
                    (&mut self.outgoing, &mut self.out_at),
                    &self.io,
                    plain,
                );
                // At TLS 1.2's limit the connection ended with this side's `close_notify`.
                self.close_sent |= records.at_limit();
                *n = sealed?;
            }
            ToSend::CloseNotify => {
                records
                    .seal_close_notify(&mut self.outgoing)
                    .map_err(|f| io::Error::other(f.error))?;
            }
            ToSend::Nothing if self.out_at < self.outgoing.len() => return Ok(Next::Flush),
            ToSend::Nothing | ToSend::Alert => {}
        }
        Ok(if self.peer_closed && records.closed() {
            Next::Closed
        } else {
            Next::Read
        })
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
        send_now(&self.io, &self.outgoing, &mut self.out_at);
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

/// Seals what `plain` holds up to a record's worth, as rustls' records are encrypted: into
/// the thread's scratch buffer and written at once, or onto `outgoing` (grown to the room
/// asked for) when bytes wait there. How much of `plain` was taken.
fn seal_and_send<S: records::Side>(
    records: &mut Records<S>,
    (outgoing, out_at): (&mut Vec<u8>, &mut usize),
    io: &TcpStream,
    plain: &[u8],
) -> io::Result<usize> {
    let plain = &plain[..plain.len().min(MAX_PLAINTEXT)];
    let waiting = *out_at < outgoing.len();
    let need = Records::<S>::sealed_len(plain.len());
    let mut seal_failed = None;
    let sent = send_encrypted(io, outgoing, waiting, |out| {
        let Some(out) = out.get_mut(..need) else {
            return Err(EncryptError::InsufficientSize(InsufficientSizeError {
                required_size: need,
            }));
        };
        records.seal(plain, out).map_err(|f| {
            seal_failed = Some(f);
            EncryptError::EncryptExhausted
        })
    });
    match (sent, seal_failed) {
        (Err(_), Some(_)) if records.at_limit() => {
            Err(end_at_key_limit(records, (outgoing, out_at), io))
        }
        (Err(_), Some(f)) => Err(io::Error::other(format!(
            "encrypting TLS data: {}",
            f.error
        ))),
        (sent, _) => sent.map(|()| plain.len()),
    }
}

/// TLS 1.2 at its suite's limit of records under one key: the connection ends with this
/// side's `close_notify` (sealed at the first write refused, not again at a later one),
/// written if the socket takes it now (best effort, as a fatal alert; what is left of
/// `outgoing` goes at the next flush). The write's error.
fn end_at_key_limit<S: records::Side>(
    records: &mut Records<S>,
    (outgoing, out_at): (&mut Vec<u8>, &mut usize),
    io: &TcpStream,
) -> io::Error {
    if !records.closed() && records.seal_close_notify(outgoing).is_err() {
        return io::Error::other(KeyLimitReached::NotSealed);
    }
    send_now(io, outgoing, out_at);
    io::Error::other(KeyLimitReached::Closed)
}

/// Writes what the socket takes now of `outgoing` past `out_at` (best effort, as an alert
/// goes), and moves `out_at` past it, so that a later flush (a shutdown) does not send it
/// again.
fn send_now(io: &TcpStream, outgoing: &[u8], out_at: &mut usize) {
    if let Ok(n) = io.try_write(&outgoing[*out_at..]) {
        *out_at += n;
    }
}

/// A TLS 1.2 connection's write refused at its cipher suite's limit of records under one
/// key (it has no key update): the connection ends there (the error inside the write's
/// `io::Error`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyLimitReached {
    #[error(
        "TLS 1.2 reached its cipher suite's limit of records under one key (it has no key \
         update): closed with close_notify"
    )]
    Closed,
    /// Sealing this side's `close_notify` failed (only the AEAD's failure does that).
    #[error(
        "TLS 1.2 reached its cipher suite's limit of records under one key; its close_notify \
         could not be sealed"
    )]
    NotSealed,
}

/// How much of `rest` rustls may see during the handshake: the `fed` bytes it has seen, and
/// the record after them if it is all there (all of `rest` otherwise: rustls waits for the
/// rest of it).
fn next_record_end(rest: &[u8], fed: usize) -> usize {
    let fed = fed.min(rest.len());
    match rest.get(fed + 3..fed + 5) {
        Some(&[a, b]) => {
            let end = fed + 5 + usize::from(u16::from_be_bytes([a, b]));
            end.min(rest.len())
        }
        _ => rest.len(),
    }
}

/// Decrypted bytes: to `reader` while it has room and nothing waits before them, the rest to
/// `plaintext` (from `plain_at`).
fn deliver(
    (plaintext, plain_at): (&mut Vec<u8>, &mut usize),
    reader: Option<&mut ReadBuf<'_>>,
    mut payload: &[u8],
) {
    if let Some(buf) = reader
        && *plain_at == plaintext.len()
    {
        let n = payload.len().min(buf.remaining());
        buf.put_slice(&payload[..n]);
        payload = &payload[n..];
    }
    if !payload.is_empty() {
        if *plain_at == plaintext.len() {
            plaintext.clear();
            *plain_at = 0;
        }
        plaintext.extend_from_slice(payload);
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

impl<C: RustlsSide> AsyncRead for TlsStream<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = this.poll_read_records(cx, buf);
        match &read {
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                this.alert_after_error();
            }
            Poll::Pending => {
                // Nothing more to read for now: the session is idle until the socket wakes
                // it, and keeps no AEAD context meanwhile (built again at the next record).
                if let Conn::Records(records) = &mut this.conn {
                    records.idle();
                }
            }
            Poll::Ready(_) => {}
        }
        read
    }
}

impl<C: RustlsSide> TlsStream<C> {
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

impl<C: RustlsSide> AsyncWrite for TlsStream<C> {
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
mod tests;
