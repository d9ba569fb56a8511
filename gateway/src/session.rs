//! One device session: accept -> hello -> app call -> reply, until close, idle or GOAWAY.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use metrics::counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use wasmbed_protocol::{ErrorCode, Frame, Goaway, Hello, Kind, ProtocolError, Welcome};

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
                write!(f, "{} ({text})", error_name(*code))
            }
            End::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

struct Conn<S> {
    shared: Arc<Shared>,
    stream: S,
    buf: Vec<u8>,
    out: Vec<u8>,
    max_frame: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// The next frame; `Ok(None)` when the peer closed cleanly.
    async fn next(&mut self) -> Result<Option<Frame>, End> {
        loop {
            match wasmbed_protocol::decode(&self.buf, self.max_frame) {
                Ok(Some((frame, used))) => {
                    self.buf.drain(..used);
                    if self.buf.is_empty() {
                        self.buf = Vec::new();
                    }
                    self.shared.meters.frame_in(frame.kind);
                    return Ok(Some(frame));
                }
                Ok(None) => {}
                Err(e) => return Err(protocol_end(e)),
            }
            // Read straight into the session's buffer: an idle session keeps no read
            // buffer beyond this reservation, and none at all between frames (below).
            self.buf.reserve(1024);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(End::Io(e)),
            }
        }
    }

    fn queue(&mut self, frame: Frame) {
        self.shared.meters.frame_out(frame.kind);
        frame.encode_into(&mut self.out);
    }

    async fn flush(&mut self) -> Result<(), End> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await.map_err(End::Io)?;
            self.stream.flush().await.map_err(End::Io)?;
            self.out = Vec::new();
        }
        Ok(())
    }

    /// Sends ERROR and ends the session.
    async fn refuse(&mut self, code: ErrorCode, seq: u64, text: String) -> End {
        counter!(ERRORS, "code" => error_name(code)).increment(1);
        self.queue(code.frame(seq, text.clone()));
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
        End::Refused(code, text)
    }
}

fn protocol_end(e: ProtocolError) -> End {
    End::Protocol(e.code(), e.to_string())
}

/// Serves one session. `identity` is the device certificate's name, when TLS presented one.
pub async fn serve<S>(
    shared: Arc<Shared>,
    stream: S,
    identity: Option<String>,
    drain: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    shared.sessions.fetch_add(1, Ordering::AcqRel);
    let mut conn = Conn {
        shared: shared.clone(),
        stream,
        buf: Vec::new(),
        out: Vec::new(),
        max_frame: shared.settings.max_frame,
    };
    let end = run(&shared, &mut conn, identity.as_deref(), &drain).await;
    let end = match end {
        End::Protocol(code, text) => conn.refuse(code, 0, text).await,
        other => other,
    };
    tracing::debug!(%end, "session ended");
    shared.sessions.fetch_sub(1, Ordering::AcqRel);
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    identity: Option<&str>,
    drain: &CancellationToken,
) -> End {
    let idle = shared.settings.idle_timeout;
    // HELLO first.
    let first = tokio::select! {
        f = tokio::time::timeout(idle, conn.next()) => f,
        _ = drain.cancelled() => return goaway(conn, "draining").await,
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
    let session = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    conn.queue(Frame::control(
        Kind::Welcome,
        0,
        &Welcome {
            session,
            gateway: shared.settings.name.clone(),
        },
    ));
    let mut pushed = 0u64;
    match instance.open().await {
        Ok(out) => queue_pushes(conn, out.pushes, &mut pushed),
        Err(e) => return conn.refuse(e.code(), 0, e.to_string()).await,
    }
    if let Err(e) = conn.flush().await {
        return e;
    }
    let mut failures = 0;
    loop {
        let next = tokio::select! {
            f = tokio::time::timeout(idle, conn.next()) => f,
            _ = drain.cancelled() => return goaway(conn, "draining").await,
        };
        let frame = match next {
            Err(_) => return conn.refuse(ErrorCode::IdleTimeout, 0, "idle".into()).await,
            Ok(Err(e)) => return e,
            Ok(Ok(None)) => return End::Closed,
            Ok(Ok(Some(f))) => f,
        };
        match frame.kind {
            Kind::Data => {
                let result = call(shared, &mut instance, &app, &frame.body).await;
                match result {
                    Ok(out) => {
                        failures = 0;
                        queue_pushes(conn, out.pushes, &mut pushed);
                        conn.queue(Frame::new(Kind::Reply, frame.seq, out.reply));
                    }
                    Err(e) => {
                        failures += 1;
                        counter!(ERRORS, "code" => error_name(e.code())).increment(1);
                        conn.queue(e.code().frame(frame.seq, e.to_string()));
                        if failures >= MAX_FAILURES {
                            let text = format!("{failures} failures in a row; last: {e}");
                            return conn.refuse(ErrorCode::TooManyTraps, 0, text).await;
                        }
                        // A failed instance may be in any state: start the next message afresh.
                        instance = match shared.host.instantiate(&app, &hello.device).await {
                            Ok(i) => i,
                            Err(e) => return conn.refuse(e.code(), 0, e.to_string()).await,
                        };
                    }
                }
            }
            Kind::Ping => conn.queue(Frame::new(Kind::Pong, frame.seq, Vec::new())),
            Kind::Pong => {}
            Kind::Hello => {
                return conn
                    .refuse(ErrorCode::BadHello, frame.seq, "HELLO sent twice".into())
                    .await;
            }
            other => {
                let text = format!("a device may not send {}", kind_name(other));
                return conn.refuse(ErrorCode::BadFrame, frame.seq, text).await;
            }
        }
        if let Err(e) = conn.flush().await {
            return e;
        }
    }
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
    app.calls.increment(1);
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

async fn goaway<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut Conn<S>, reason: &str) -> End {
    conn.queue(Frame::control(
        Kind::Goaway,
        0,
        &Goaway {
            reason: reason.into(),
        },
    ));
    let _ = conn.flush().await;
    let _ = conn.stream.shutdown().await;
    End::Goaway
}

pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Hello => "hello",
        Kind::Welcome => "welcome",
        Kind::Data => "data",
        Kind::Reply => "reply",
        Kind::Push => "push",
        Kind::Ping => "ping",
        Kind::Pong => "pong",
        Kind::Error => "error",
        Kind::Goaway => "goaway",
    }
}

pub fn error_name(c: ErrorCode) -> &'static str {
    match c {
        ErrorCode::BadFrame => "bad_frame",
        ErrorCode::FrameTooLarge => "frame_too_large",
        ErrorCode::UnknownType => "unknown_type",
        ErrorCode::BadHello => "bad_hello",
        ErrorCode::UnknownApp => "unknown_app",
        ErrorCode::IdentityMismatch => "identity_mismatch",
        ErrorCode::NoSession => "no_session",
        ErrorCode::AppTrap => "app_trap",
        ErrorCode::AppTimeout => "app_timeout",
        ErrorCode::AppMemory => "app_memory",
        ErrorCode::TooManyTraps => "too_many_traps",
        ErrorCode::IdleTimeout => "idle_timeout",
        ErrorCode::Unavailable => "unavailable",
    }
}
