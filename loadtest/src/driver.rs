//! One simulated device: a thin tokio driver of [`wasmbed_device::Session`], the same state
//! machine firmware ships. The driver opens the transport when the session asks, moves bytes
//! both ways, sends DATA at the fleet's rate, sleeps until the session's next timeout, and
//! turns the session's events into the fleet's counts and timings.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use wasmbed_device::{Cause, Config, Event, Resume, SendError, Session, Status};
use wasmbed_protocol::ErrorCode;

use crate::{
    CONNECT_TIMEOUT, COUNTER_APP, CounterCheck, Ctx, DeviceOutcome, GRACE, Stream, device_id,
    micros,
};

/// Bytes read from the connection at a time.
const READ_CHUNK: usize = 4096;

/// A simulated device's session sizes, from the fleet's payload: the window holds 64 DATA
/// (at least 4 KiB); a ticket may carry a state as large as a DATA (the `blob` app keeps
/// its last one) plus the ticket's own fields; a frame may be an echoed DATA or a CHECKPOINT
/// with such a ticket. The memory is the session's for its whole life (zeroed, so touched):
/// with the default 32-byte payload about 12 KB a device, what the fleet loop held before.
fn sizes(payload: usize) -> (usize, usize, usize) {
    let window = (64 * (payload + 13)).max(4 << 10);
    let ticket = payload + (2 << 10);
    let frame = payload.max(ticket + 64) + (1 << 10);
    (window, frame, ticket)
}

/// The session's clock: milliseconds since the fleet started.
fn millis(ctx: &Ctx) -> u64 {
    ctx.start.elapsed().as_millis().min(u128::from(u64::MAX)) as u64
}

fn at(ctx: &Ctx, ms: u64) -> tokio::time::Instant {
    (ctx.start + Duration::from_millis(ms)).into()
}

/// Opens TLS over TCP, or a QUIC connection's stream.
async fn dial(i: usize, ctx: &Ctx) -> Result<Stream, String> {
    let s = &ctx.settings;
    if let Some(quic) = &ctx.quic {
        return quic.connect(i, ctx).await;
    }
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(s.target))
        .await
        .map_err(|_| "connect timeout".to_string())?
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(s.sni.clone()).map_err(|_| "bad --sni".to_string())?;
    let connector = tokio_rustls::TlsConnector::from(ctx.configs[i].clone());
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake timeout".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    Ok(Box::new(tls))
}

/// What one device keeps besides its session: timings and the fleet's view.
struct Device<'c> {
    i: usize,
    ctx: &'c Ctx,
    out: DeviceOutcome,
    /// When each DATA without an answer event was given, oldest first.
    sent_at: VecDeque<Instant>,
    counter: Option<CounterCheck>,
    /// The connection came up at (for WELCOME's latency), and the session dropped at.
    connected_at: Option<Instant>,
    dropped_at: Option<Instant>,
    /// A WELCOME came on the current connection.
    welcomed_now: bool,
}

impl Device<'_> {
    fn see(&mut self, e: Event<'_>) {
        let live = &self.ctx.live;
        match e {
            Event::Welcome {
                gateway, resume, ..
            } => self.welcome(gateway, resume),
            Event::Reply { body, .. } => {
                self.out.answered += 1;
                live.answered.fetch_add(1, Ordering::Relaxed);
                if self.counter.as_mut().is_some_and(|c| c.reset(body)) {
                    self.out.state_resets += 1;
                }
                if let Some(sent) = self.sent_at.pop_front() {
                    let mut h = self.ctx.hist.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = h.reply.record(micros(sent.elapsed()));
                }
            }
            Event::Failed { code, .. } => {
                self.sent_at.pop_front();
                self.out.errors += 1;
                *self.out.error_causes.entry(cause_name(code)).or_default() += 1;
            }
            Event::Covered { .. } => {
                self.sent_at.pop_front();
                self.out.duplicates_refused += 1;
            }
            Event::Lost { .. } => {
                self.sent_at.pop_front();
                self.out.lost += 1;
            }
            Event::Checkpoint { .. } => {
                if !self.out.tickets {
                    self.out.tickets = true;
                    live.ticketed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::Push { .. } | Event::Goaway => {}
            Event::Disconnected { cause } => self.disconnected(cause),
        }
    }

    fn welcome(&mut self, gateway: &str, resume: Resume<'_>) {
        let live = &self.ctx.live;
        self.out.failure = None;
        self.welcomed_now = true;
        if !self.out.welcomed {
            self.out.welcomed = true;
            live.welcomed.fetch_add(1, Ordering::Relaxed);
        }
        live.connected_now.fetch_add(1, Ordering::Relaxed);
        live.set_gateway(self.i, Some(gateway.to_string()));
        let mut h = self.ctx.hist.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = self.connected_at.take() {
            let _ = h.welcome.record(micros(t.elapsed()));
        }
        if let Some(t) = self.dropped_at.take() {
            let _ = h.rehome.record(micros(t.elapsed()));
            live.rehomed.fetch_add(1, Ordering::Relaxed);
            live.rehomed_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Instant::now());
        }
        match resume {
            Resume::Restored { .. } | Resume::Stateless { .. } => self.out.resumed += 1,
            Resume::Refused { reason } => {
                // A bounded set of keys whatever the peer sends.
                let reason = match reason {
                    "expired" | "bad_ticket" | "other_device" | "other_app" | "restore_failed" => {
                        reason
                    }
                    _ => "other",
                };
                *self.out.resume_refused.entry(reason.into()).or_default() += 1;
            }
            Resume::New => {}
        }
    }

    fn disconnected(&mut self, cause: Cause) {
        match cause {
            Cause::Refused { code, .. } => {
                self.out.errors += 1;
                *self.out.error_causes.entry(cause_name(code)).or_default() += 1;
                if !self.welcomed_now {
                    self.out.failure = Some(cause_name(code));
                }
            }
            Cause::Violation(v) => {
                *self
                    .out
                    .error_causes
                    .entry(format!("protocol violation ({v:?})"))
                    .or_default() += 1;
            }
            Cause::Closed | Cause::Goaway | Cause::Silent => {}
        }
        if !std::mem::take(&mut self.welcomed_now) {
            return;
        }
        let live = &self.ctx.live;
        live.connected_now.fetch_sub(1, Ordering::Relaxed);
        live.disconnects.fetch_add(1, Ordering::Relaxed);
        if cause == Cause::Goaway {
            live.left_on_goaway.fetch_add(1, Ordering::Relaxed);
        } else {
            live.cut.fetch_add(1, Ordering::Relaxed);
        }
        live.set_gateway(self.i, None);
        self.dropped_at = Some(Instant::now());
        self.out.reconnects += 1;
    }
}

/// An ERROR as a report counts it: by its code (`ERROR frame_too_large`), never by the
/// peer's free text (a bounded number of keys whatever the peer sends).
fn cause_name(code: u16) -> String {
    match ErrorCode::from_u16(code) {
        Some(c) => format!("ERROR {}", c.as_str()),
        None => format!("ERROR code {code}"),
    }
}

fn drain(session: &mut Session<Vec<u8>>, d: &mut Device<'_>) {
    while let Some(e) = session.poll_event() {
        d.see(e);
    }
}

/// One device: connect, send at the rate, reconnect (resending what was not answered), all
/// by the session's rules. `finish`: stop sending, wait (at most [`GRACE`]) for the replies,
/// end.
pub(crate) async fn device(i: usize, ctx: &Ctx, finish: &CancellationToken) -> DeviceOutcome {
    let s = &ctx.settings;
    let id = device_id(s.first_device + i);
    let (window, max_frame, max_ticket) = sizes(s.payload);
    let config = Config {
        window,
        max_frame,
        max_ticket,
        // Devices send at a rate; the gateway's idle timeout and QUIC's own keep-alive
        // cover a silent peer.
        keepalive_ms: 0,
        answer_timeout_ms: CONNECT_TIMEOUT.as_millis() as u64,
        first_backoff_ms: 20,
        max_backoff_ms: 2000,
        seed: fastrand::u64(..),
        ..Config::new(&id, &s.app)
    };
    let memory = vec![0u8; Session::<Vec<u8>>::memory(&config)];
    let mut session = match Session::new(&config, memory) {
        Ok(session) => session,
        Err(e) => {
            return DeviceOutcome {
                failure: Some(format!("device session: {e:?}")),
                ..DeviceOutcome::default()
            };
        }
    };
    let mut d = Device {
        i,
        ctx,
        out: DeviceOutcome::default(),
        sent_at: VecDeque::new(),
        counter: (s.app == COUNTER_APP).then(CounterCheck::default),
        connected_at: None,
        dropped_at: None,
        welcomed_now: false,
    };
    let send_until = ctx.start + s.duration;
    let give_up = async {
        tokio::select! {
            _ = tokio::time::sleep_until((send_until + GRACE).into()) => {}
            _ = async { finish.cancelled().await; tokio::time::sleep(GRACE).await } => {}
        }
    };
    let mut give_up = std::pin::pin!(give_up);
    let interval = Duration::from_secs_f64(1.0 / s.rate);
    let payload: Vec<u8> = (0..s.payload).map(|b| (b ^ i) as u8).collect();
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + interval.mul_f64(fastrand::f64()),
        interval,
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stream: Option<Stream> = None;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        drain(&mut session, &mut d);
        let sending = Instant::now() < send_until && !finish.is_cancelled();
        if !sending && session.owed() == 0 {
            break;
        }
        match session.status() {
            Status::Done => break,
            Status::Close => {
                stream = None;
                session.closed(millis(ctx));
            }
            Status::Wait => {
                let until = session.poll_timeout().unwrap_or(u64::MAX / 2);
                tokio::select! {
                    _ = tokio::time::sleep_until(at(ctx, until)) => session.handle_timeout(millis(ctx)),
                    _ = &mut give_up => break,
                }
            }
            Status::Connect => {
                let t0 = Instant::now();
                tokio::select! {
                    r = dial(i, ctx) => match r {
                        Ok(s) => {
                            let mut h = ctx.hist.lock().unwrap_or_else(|e| e.into_inner());
                            let _ = h.handshake.record(micros(t0.elapsed()));
                            drop(h);
                            stream = Some(s);
                            d.connected_at = Some(Instant::now());
                            session.connected(millis(ctx));
                        }
                        Err(reason) => {
                            d.out.failure = Some(reason);
                            session.closed(millis(ctx));
                        }
                    },
                    _ = &mut give_up => {
                        if d.out.failure.is_none() {
                            d.out.failure = Some(still_dialing(ctx));
                        }
                        break;
                    }
                }
            }
            Status::Connected => {
                let Some(io) = stream.as_mut() else {
                    session.closed(millis(ctx));
                    continue;
                };
                // Write what the session has, then wait for bytes, a tick or a timeout.
                let out = session.poll_send();
                if !out.is_empty() {
                    let written = match io.write(out).await {
                        Ok(n) if n > 0 => Some(n),
                        _ => None,
                    };
                    if let Some(n) = written {
                        session.sent(n);
                    }
                    let flushed = written.is_some()
                        && (!session.poll_send().is_empty() || io.flush().await.is_ok());
                    if !flushed {
                        stream = None;
                        session.closed(millis(ctx));
                    }
                    continue;
                }
                let timeout = session.poll_timeout();
                tokio::select! {
                    r = io.read(&mut buf) => match r {
                        Ok(n) if n > 0 => {
                            let now = millis(ctx);
                            let mut rest = &buf[..n];
                            while !rest.is_empty() {
                                let took = session.feed(rest, now);
                                rest = &rest[took..];
                                drain(&mut session, &mut d);
                            }
                        }
                        _ => {
                            stream = None;
                            session.closed(millis(ctx));
                        }
                    },
                    _ = ticker.tick(), if sending => match session.send_data(&payload) {
                        Ok(_) => {
                            d.sent_at.push_back(Instant::now());
                            d.out.sent += 1;
                            ctx.live.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(SendError::WindowFull) => {
                            *d.out.error_causes.entry("window full: DATA not sent".into()).or_default() += 1;
                        }
                        Err(e) => {
                            d.out.failure = Some(format!("send: {e:?}"));
                        }
                    },
                    _ = tokio::time::sleep_until(at(ctx, timeout.unwrap_or(u64::MAX / 2))), if timeout.is_some() => {
                        session.handle_timeout(millis(ctx));
                    }
                    _ = finish.cancelled(), if sending => {}
                    _ = tokio::time::sleep_until(send_until.into()), if sending => {}
                    _ = &mut give_up => break,
                }
            }
        }
    }
    drain(&mut session, &mut d);
    if d.welcomed_now {
        // Still connected at the end: leave the gateway in the spread, count as disconnected.
        ctx.live.connected_now.fetch_sub(1, Ordering::Relaxed);
    }
    d.out.lost += session.owed();
    d.out.duplicated = session.stats().duplicates;
    d.out
}

/// Still dialing when the run ended: say so (a QUIC device dialing a port where nothing
/// speaks QUIC hears nothing back, not a refusal).
fn still_dialing(ctx: &Ctx) -> String {
    let s = &ctx.settings;
    format!(
        "connect: no answer from {} before the run ended ({})",
        s.target,
        match s.transport {
            wasmbed_config::loadtest::Transport::Quic =>
                "QUIC over UDP: is it a --quic-listen address?",
            wasmbed_config::loadtest::Transport::Tcp => "TLS over TCP",
        }
    )
}
