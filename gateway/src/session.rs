//! One device session: accept -> hello -> app call -> reply, until close, idle or GOAWAY.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use std::time::SystemTime;

use bytes::BytesMut;
use metrics::counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;
use wasmbed_protocol::codec::{CodecError, FrameCodec};
use wasmbed_protocol::{
    Checkpoint, ErrorCode, Frame, Goaway, Hello, Kind, ProtocolError, Resumed, Welcome,
};

use crate::ticket::{Refused, SessionTickets, TicketBody};

use crate::Shared;
use crate::host::{App, CallError, Instance, Output};
use crate::metrics::ERRORS;

/// Failures in a row after which a session is closed.
pub const MAX_FAILURES: u32 = 3;

/// How a session ended, for logs.
#[derive(Debug)]
enum End {
    Closed,
    Goaway,
    /// Answered with ERROR and closed.
    Refused(ErrorCode, String),
    /// A frame that broke the protocol, not answered yet.
    Protocol(ErrorCode, String),
    Io(std::io::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed => write!(f, "closed by the device"),
            End::Goaway => write!(f, "GOAWAY sent"),
            End::Refused(code, text) | End::Protocol(code, text) => {
                write!(f, "{} ({text})", code.as_str())
            }
            End::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

struct Conn<S> {
    shared: Arc<Shared>,
    stream: S,
    codec: FrameCodec,
    buf: BytesMut,
    out: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(shared: Arc<Shared>, stream: S) -> Conn<S> {
        let codec = FrameCodec::new(shared.settings.max_frame);
        Conn {
            shared,
            stream,
            codec,
            buf: BytesMut::new(),
            out: BytesMut::new(),
        }
    }

    /// The next frame; `Ok(None)` when the peer closed cleanly.
    ///
    /// The protocol's codec over the session's own buffers rather than `Framed`: `Framed`
    /// keeps an 8 KiB read and an 8 KiB write buffer for the life of the connection, and an
    /// idle session here keeps none (10,000 idle sessions: 160 MiB less).
    async fn next(&mut self) -> Result<Option<Frame>, End> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    if self.buf.is_empty() {
                        self.buf = BytesMut::new();
                    }
                    self.shared.meters.frame_in(frame.kind);
                    return Ok(Some(frame));
                }
                Ok(None) => {}
                Err(CodecError::Protocol(e)) => return Err(protocol_end(e)),
                Err(CodecError::Io(e)) => return Err(End::Io(e)),
            }
            self.buf.reserve(1024);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(End::Io(e)),
            }
        }
    }

    /// The next frame if one is already here (buffered, or readable without waiting).
    async fn next_ready(&mut self) -> Option<Frame> {
        match tokio::time::timeout(std::time::Duration::ZERO, self.next()).await {
            Ok(Ok(frame)) => frame,
            _ => None,
        }
    }

    fn queue(&mut self, frame: Frame) {
        let frame = match self.codec.encode(&frame, &mut self.out) {
            Ok(()) => return self.shared.meters.frame_out(frame.kind),
            // An ERROR's text (a trap's backtrace, names the device chose) may be longer than
            // the frame limit: cut to fit, since every DATA gets exactly one answer.
            Err(_) if frame.kind == Kind::Error => fitted(&frame, self.codec.max()),
            Err(e) => {
                // The host bounds replies and pushes by the same maximum: not reached in
                // practice.
                tracing::warn!(error = %e, kind = frame.kind.as_str(), "frame not sent");
                return;
            }
        };
        match self.codec.encode(&frame, &mut self.out) {
            Ok(()) => self.shared.meters.frame_out(frame.kind),
            Err(e) => tracing::warn!(error = %e, "ERROR not sent"),
        }
    }

    /// Writes what is queued, each step within the idle timeout: a device that reads nothing
    /// for that long is as gone as one that sends nothing, and a write waiting on it for good
    /// would hold the session (its slot, its instance, its queued output) past its idle
    /// timeout, a drain and a revocation, all of which are heard between frames. A slow
    /// device that keeps reading is not cut (the deadline moves with each partial write).
    async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let idle = self.shared.settings.idle_timeout;
        let stalled = || {
            End::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the device read nothing for the idle timeout",
            ))
        };
        // One clock read a flush: again only after a partial write (the device's window full).
        let mut deadline = tokio::time::Instant::now() + idle;
        let mut at = 0;
        while at < self.out.len() {
            let write = self.stream.write(&self.out[at..]);
            match tokio::time::timeout_at(deadline, write).await {
                Ok(Ok(0)) => return Err(End::Io(std::io::ErrorKind::WriteZero.into())),
                Ok(Ok(n)) => {
                    at += n;
                    if at < self.out.len() {
                        deadline = tokio::time::Instant::now() + idle;
                    }
                }
                Ok(Err(e)) => return Err(End::Io(e)),
                Err(_) => return Err(stalled()),
            }
        }
        match tokio::time::timeout_at(deadline, self.stream.flush()).await {
            Ok(flushed) => flushed.map_err(End::Io)?,
            Err(_) => return Err(stalled()),
        }
        self.out = BytesMut::new();
        Ok(())
    }

    /// Closes the device's side (TLS: its close_notify), within the idle timeout: a device
    /// that reads nothing would hold a TLS shutdown, which writes, as long as a flush.
    async fn close(&mut self) {
        let idle = self.shared.settings.idle_timeout;
        let _ = tokio::time::timeout(idle, self.stream.shutdown()).await;
    }

    /// Sends ERROR and ends the session.
    async fn refuse(&mut self, code: ErrorCode, seq: u64, text: String) -> End {
        counter!(ERRORS, "code" => code.as_str()).increment(1);
        self.queue(code.frame(seq, text.clone()));
        let _ = self.flush().await;
        self.close().await;
        End::Refused(code, text)
    }
}

/// An ERROR frame whose text is cut (on a character boundary, marked `…`) so that the frame
/// fits `max` bytes.
fn fitted(frame: &Frame, max: usize) -> Frame {
    let body: wasmbed_protocol::ErrorBody = match frame.decode_body("ERROR") {
        Ok(b) => b,
        Err(_) => return frame.clone(),
    };
    let bare = Frame::control(
        Kind::Error,
        frame.seq,
        &wasmbed_protocol::ErrorBody {
            code: body.code,
            text: String::new(),
        },
    );
    // The text's CBOR head takes at most 9 bytes, the mark 3.
    let room = max.saturating_sub(wasmbed_protocol::HEADER + bare.body.len() + 9 + 3);
    let mut cut = room.min(body.text.len());
    while !body.text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut text = body.text[..cut].to_string();
    text.push('…');
    Frame::control(
        Kind::Error,
        frame.seq,
        &wasmbed_protocol::ErrorBody {
            code: body.code,
            text,
        },
    )
}

fn protocol_end(e: ProtocolError) -> End {
    End::Protocol(e.code(), e.to_string())
}

/// Serves one session. `identity` is the device certificate's name and `serial` its issuer
/// and serial number ([`wasmbed_certs::Leaf::revocation_key`], for revocation while the session
/// lives), when TLS presented one.
pub async fn serve<S>(
    shared: Arc<Shared>,
    stream: S,
    (identity, serial): (Option<String>, Option<Vec<u8>>),
    drain: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Conn::new(shared.clone(), stream);
    // A full gateway says so at once (ERROR `unavailable`) rather than taking the session.
    let max = shared.settings.max_sessions as usize;
    if shared.sessions.fetch_add(1, Ordering::AcqRel) >= max {
        shared.sessions.fetch_sub(1, Ordering::AcqRel);
        let text = format!("this gateway is at its maximum of {max} sessions");
        let end = conn.refuse(ErrorCode::Unavailable, 0, text).await;
        tracing::debug!(%end, "session refused");
        return;
    }
    let device = Device {
        identity: identity.as_deref(),
        serial: serial.as_deref(),
    };
    let end = run(&shared, &mut conn, device, &drain).await;
    let end = match end {
        End::Protocol(code, text) => conn.refuse(code, 0, text).await,
        other => other,
    };
    tracing::debug!(%end, "session ended");
    shared.sessions.fetch_sub(1, Ordering::AcqRel);
}

/// What TLS said of the device: its certificate's name, and its issuer and serial number
/// ([`wasmbed_certs::Leaf::revocation_key`]).
#[derive(Clone, Copy)]
struct Device<'a> {
    identity: Option<&'a str>,
    serial: Option<&'a [u8]>,
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    Device { identity, serial }: Device<'_>,
    drain: &CancellationToken,
) -> End {
    let mut reloads = shared.tls.subscribe();
    // A revocation installed between the handshake's check and this subscription is heard
    // by no reload from now: checked once here.
    if serial.is_some_and(|s| shared.is_revoked(s)) {
        counter!(crate::metrics::REVOKED).increment(1);
        let text = "the device's certificate was revoked".to_string();
        return conn.refuse(ErrorCode::Revoked, 0, text).await;
    }
    let idle = shared.settings.idle_timeout;
    // HELLO first; a gateway that drains answers a new session GOAWAY, whatever arrived first
    // (over a link, where streams are still taken while it drains: the proxy then tries
    // another gateway).
    let first = tokio::select! {
        biased;
        _ = drain.cancelled() => {
            send_goaway(conn, "draining").await;
            conn.close().await;
            return End::Goaway;
        }
        f = tokio::time::timeout(idle, conn.next()) => f,
    };
    let hello_frame = match first {
        Err(_) => {
            return conn
                .refuse(ErrorCode::IdleTimeout, 0, "no HELLO in time".into())
                .await;
        }
        Ok(Err(e)) => return e,
        Ok(Ok(None)) => return End::Closed,
        Ok(Ok(Some(f))) => f,
    };
    if hello_frame.kind != Kind::Hello {
        return conn
            .refuse(
                ErrorCode::NoSession,
                hello_frame.seq,
                "the first frame must be HELLO".into(),
            )
            .await;
    }
    let hello: Hello = match hello_frame.decode_body("HELLO") {
        Ok(h) => h,
        Err(e) => return conn.refuse(ErrorCode::BadHello, 0, e.to_string()).await,
    };
    if hello.device.is_empty() || hello.app.is_empty() {
        return conn
            .refuse(ErrorCode::BadHello, 0, "empty device or app".into())
            .await;
    }
    if let Some(id) = identity
        && id != hello.device
    {
        let text = format!("HELLO names {:?}, the certificate {id:?}", hello.device);
        return conn.refuse(ErrorCode::IdentityMismatch, 0, text).await;
    }
    let span = tracing::Span::current();
    span.record("device", hello.device.as_str());
    span.record("app", hello.app.as_str());
    let Some(app) = shared.host.get(&hello.app) else {
        let text = format!("no application named {:?} on this gateway", hello.app);
        return conn.refuse(ErrorCode::UnknownApp, 0, text).await;
    };
    let started = Instant::now();
    let mut instance = match shared.host.instantiate(&app, &hello.device).await {
        Ok(i) => i,
        Err(e) => return conn.refuse(e.code(), 0, e.to_string()).await,
    };
    shared
        .meters
        .instantiate
        .record(started.elapsed().as_secs_f64());
    // A ticket in HELLO: resume from it if it opens and belongs to this device and app; a
    // ticket that does not never fails the session, which then starts fresh.
    let ticket = hello
        .resume
        .as_deref()
        .map(|t| open_ticket(shared, t, &hello.device, &hello.app));
    // `resumed_state`: "restored" or "fresh" when the session resumed from the ticket.
    let (mut resumed_state, mut refused, mut floor, mut pushed, mut session) =
        (None::<&'static str>, None, 0, 0, None);
    match ticket {
        None => {}
        Some(Err(r)) => refused = Some(r),
        Some(Ok(t)) => {
            let state = match (&t.state, instance.stateful()) {
                (Some(state), true) => {
                    let started = Instant::now();
                    let r = instance.restore(state).await;
                    shared
                        .meters
                        .restore
                        .record(started.elapsed().as_secs_f64());
                    match r {
                        Ok(()) => Some("restored"),
                        Err(e) => {
                            tracing::info!(error = %e, "restore failed: the session starts fresh");
                            None
                        }
                    }
                }
                _ => Some("fresh"),
            };
            match state {
                Some(state) => {
                    resumed_state = Some(state);
                    (floor, pushed, session) = (t.seq, t.pushes, Some(t.session));
                }
                None => {
                    refused = Some(Refused::RestoreFailed);
                    // The failed restore may have left the instance in any state.
                    let renewed = shared.host.renew(&mut instance, &app, &hello.device);
                    if let Err(e) = renewed.await {
                        return conn.refuse(e.code(), 0, e.to_string()).await;
                    }
                }
            }
        }
    }
    if let Some(outcome) = resumed_state.or(refused.map(Refused::as_str)) {
        counter!(crate::metrics::RESUMES, "outcome" => outcome).increment(1);
    }
    let restored = resumed_state == Some("restored");
    let resumed = resumed_state.map(|state| Resumed {
        seq: floor,
        state: state.into(),
    });
    let session =
        session.unwrap_or_else(|| format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)));
    conn.queue(Frame::control(
        Kind::Welcome,
        0,
        &Welcome {
            session: session.clone(),
            gateway: shared.settings.name.clone(),
            resumed,
            resume_refused: refused.map(|r| r.as_str().to_string()),
        },
    ));
    let mut live = Live {
        app,
        instance,
        device: hello.device,
        session,
        failures: 0,
        pushed,
        floor,
        answered: floor,
        unsealed: 0,
    };
    // `on_open` runs for a session that starts afresh, not for one whose state came back.
    if !restored {
        match live.instance.open().await {
            Ok(out) => queue_pushes(conn, out.pushes, &mut live.pushed),
            Err(e) => return conn.refuse(e.code(), 0, e.to_string()).await,
        }
    }
    if let Err(e) = conn.flush().await {
        return e;
    }
    loop {
        let next = tokio::select! {
            f = tokio::time::timeout(idle, conn.next()) => f,
            _ = drain.cancelled() => return goaway(shared, conn, &mut live, "draining").await,
            r = reloads.changed(), if serial.is_some() => {
                if r.is_ok() && serial.is_some_and(|s| shared.is_revoked(s)) {
                    counter!(crate::metrics::REVOKED).increment(1);
                    tracing::info!(device = %live.device, "certificate revoked: session closed");
                    let text = "the device's certificate was revoked".to_string();
                    return conn.refuse(ErrorCode::Revoked, 0, text).await;
                }
                continue;
            }
        };
        let frame = match next {
            Err(_) => return conn.refuse(ErrorCode::IdleTimeout, 0, "idle".into()).await,
            Ok(Err(e)) => return e,
            Ok(Ok(None)) => return End::Closed,
            Ok(Ok(Some(f))) => f,
        };
        if let Err(end) = handle(shared, conn, &mut live, frame).await {
            return end;
        }
        if let Err(e) = conn.flush().await {
            return e;
        }
    }
}

/// A session past its WELCOME.
struct Live {
    app: Arc<App>,
    instance: Instance,
    device: String,
    session: String,
    /// Failed calls in a row.
    failures: u32,
    /// Sequence of the last PUSH sent.
    pushed: u64,
    /// The resumed sequence: DATA up to it was answered before, on another connection.
    floor: u64,
    /// The last DATA answered by a REPLY.
    answered: u64,
    /// REPLYs since the last CHECKPOINT.
    unsealed: u32,
}

/// Answers one frame of a live session (queued, not flushed). `Err`: the session is over.
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    live: &mut Live,
    frame: Frame,
) -> Result<(), End> {
    match frame.kind {
        Kind::Data if frame.seq <= live.floor => {
            // Answered before the session moved: not run again.
            counter!(ERRORS, "code" => ErrorCode::Duplicate.as_str()).increment(1);
            let text = format!("DATA {} is covered by the resumed session", frame.seq);
            conn.queue(ErrorCode::Duplicate.frame(frame.seq, text));
        }
        Kind::Data => match call(shared, &mut live.instance, &live.app, &frame.body).await {
            Ok(out) => {
                live.failures = 0;
                queue_pushes(conn, out.pushes, &mut live.pushed);
                conn.queue(Frame::new(Kind::Reply, frame.seq, out.reply));
                live.answered = live.answered.max(frame.seq);
                live.unsealed += 1;
                if shared
                    .settings
                    .checkpoint_every
                    .is_some_and(|n| live.unsealed >= n)
                {
                    checkpoint(shared, conn, live).await;
                }
            }
            Err(e) => {
                live.failures += 1;
                counter!(ERRORS, "code" => e.code().as_str()).increment(1);
                conn.queue(e.code().frame(frame.seq, e.to_string()));
                if live.failures >= MAX_FAILURES {
                    let text = format!("{} failures in a row; last: {e}", live.failures);
                    return Err(conn.refuse(ErrorCode::TooManyTraps, 0, text).await);
                }
                // A failed instance may be in any state: start the next message afresh.
                let renewed = shared
                    .host
                    .renew(&mut live.instance, &live.app, &live.device);
                if let Err(e) = renewed.await {
                    return Err(conn.refuse(e.code(), 0, e.to_string()).await);
                }
            }
        },
        Kind::Ping => conn.queue(Frame::new(Kind::Pong, frame.seq, Vec::new())),
        Kind::Pong => {}
        Kind::Hello => {
            let text = "HELLO sent twice".into();
            return Err(conn.refuse(ErrorCode::BadHello, frame.seq, text).await);
        }
        other => {
            let text = format!("a device may not send {}", other.as_str());
            return Err(conn.refuse(ErrorCode::BadFrame, frame.seq, text).await);
        }
    }
    Ok(())
}

/// Opens a HELLO's ticket with the fleet's key ring and checks it names this device and app.
fn open_ticket(
    shared: &Shared,
    ticket: &[u8],
    device: &str,
    app: &str,
) -> Result<TicketBody, Refused> {
    let keys = shared.keys.load_full().ok_or(Refused::BadTicket)?;
    let body = keys.open(ticket, SystemTime::now())?;
    if body.device != device {
        tracing::warn!(ticket_device = %body.device, "a ticket presented by another device");
        return Err(Refused::OtherDevice);
    }
    if body.app != app {
        return Err(Refused::OtherApp);
    }
    Ok(body)
}

/// Seals the session as it is now (the app's `snapshot`, the last answered DATA) and
/// queues CHECKPOINT. A failed snapshot is counted and logged; the session goes on without
/// a new ticket.
async fn checkpoint<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    live: &mut Live,
) {
    let Some(keys) = shared.keys.load_full() else {
        return;
    };
    let started = Instant::now();
    let state = match live.instance.snapshot().await {
        Ok(state) => state,
        Err(e) => {
            shared.meters.checkpoint_failed.increment(1);
            tracing::info!(error = %e, "checkpoint failed: no new ticket");
            return;
        }
    };
    shared
        .meters
        .snapshot
        .record(started.elapsed().as_secs_f64());
    let now = SystemTime::now();
    let body = TicketBody {
        device: live.device.clone(),
        app: live.app.name.clone(),
        module: serde_bytes::ByteBuf::from(live.app.digest.to_vec()),
        session: live.session.clone(),
        seq: live.answered,
        pushes: live.pushed,
        issued: crate::ticket::unix(now),
        expires: crate::ticket::unix(now + shared.settings.ticket_lifetime),
        state: state.map(serde_bytes::ByteBuf::from),
    };
    let Some(ticket) = keys.seal(&body) else {
        shared.meters.checkpoint_failed.increment(1);
        return;
    };
    // A ticket the device could not bring back is no ticket: the HELLO that carries it (and
    // so the CHECKPOINT, smaller) must fit the frame limit (`--max-state` near
    // `--max-frame`); else the checkpoint fails, counted, and the session keeps its last.
    let hello = wasmbed_protocol::HEADER
        + wasmbed_protocol::body::HelloRef::max_len(
            live.device.len(),
            live.app.name.len(),
            ticket.len(),
        );
    if hello > shared.settings.max_frame {
        shared.meters.checkpoint_failed.increment(1);
        tracing::warn!(
            ticket = ticket.len(),
            max_frame = shared.settings.max_frame,
            "checkpoint failed: its ticket is too large for a HELLO to bring back \
             (--max-state against --max-frame)"
        );
        return;
    }
    shared.meters.ticket_bytes.record(ticket.len() as f64);
    shared.meters.checkpoints.increment(1);
    live.unsealed = 0;
    let frame = Frame::control(
        Kind::Checkpoint,
        live.answered,
        &Checkpoint {
            ticket: serde_bytes::ByteBuf::from(ticket),
        },
    );
    conn.queue(frame);
}

async fn call(
    shared: &Shared,
    instance: &mut Instance,
    app: &App,
    data: &[u8],
) -> Result<Output, CallError> {
    let started = Instant::now();
    let result = instance.message(data).await;
    shared.meters.call.record(started.elapsed().as_secs_f64());
    app.calls.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = &result {
        counter!(crate::metrics::TRAPS, "kind" => e.kind()).increment(1);
        tracing::debug!(error = %e, "application call failed");
    }
    result
}

fn queue_pushes<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    pushes: Vec<Vec<u8>>,
    seq: &mut u64,
) {
    for p in pushes {
        *seq += 1;
        conn.queue(Frame::new(Kind::Push, *seq, p));
    }
}

/// GOAWAY, then an answer to every frame the gateway has already received (buffered, or
/// readable without waiting), then the close: a device loses nothing it sent before GOAWAY.
async fn goaway<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    live: &mut Live,
    reason: &str,
) -> End {
    send_goaway(conn, reason).await;
    while let Some(frame) = conn.next_ready().await {
        if let Err(end) = handle(shared, conn, live, frame).await {
            return end;
        }
        if let Err(e) = conn.flush().await {
            return e;
        }
    }
    // The last CHECKPOINT, after the last answer: the device resumes from exactly here.
    // With `--checkpoint off` too, the one it sends (without a key ring, none).
    if live.unsealed > 0 {
        checkpoint(shared, conn, live).await;
        let _ = conn.flush().await;
    }
    conn.close().await;
    End::Goaway
}

async fn send_goaway<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut Conn<S>, reason: &str) {
    conn.queue(Frame::control(
        Kind::Goaway,
        0,
        &Goaway {
            reason: reason.into(),
        },
    ));
    let _ = conn.flush().await;
}
