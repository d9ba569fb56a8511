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
                    live.state_resets.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(sent) = self.sent_at.pop_front() {
                    let wait = sent.elapsed();
                    live.note_reply(wait);
                    let mut h = self.ctx.hist.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = h.reply.record(micros(wait));
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
        let welcomed = self.welcomed_now;
        let what = match cause {
            Cause::Refused { code, .. } => Some(cause_name(code)),
            Cause::Violation(v) => Some(format!("protocol violation ({v:?})")),
            Cause::Closed | Cause::Goaway | Cause::Silent => None,
        };
        if welcomed {
            // As before the device library: an ERROR or a violation on a session counts.
            if let Some(what) = what {
                self.out.errors += 1;
                *self.out.error_causes.entry(what).or_default() += 1;
            }
        } else {
            // A session that never opened: why, for the report's failures.
            self.out.failure = Some(match (cause, what) {
                (_, Some(what)) => what,
                (Cause::Silent, _) => "no WELCOME in time".into(),
                (Cause::Goaway, _) => "GOAWAY before WELCOME".into(),
                _ => self
                    .out
                    .failure
                    .take()
                    .unwrap_or_else(|| "closed before WELCOME".into()),
            });
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

/// A device's session and its connection, as the loop below drives them.
struct Driver<'c> {
    d: Device<'c>,
    session: Session<Vec<u8>>,
    stream: Option<Stream>,
    buf: Vec<u8>,
    payload: Vec<u8>,
    interval: Duration,
    ticker: tokio::time::Interval,
    /// The fleet's storm, watched through a token of this device's own (polled every turn:
    /// the fleet's shared token would make every device take one lock), and whether this
    /// device has had it.
    storm: CancellationToken,
    stormed: bool,
    /// The fleet's churn epoch last seen, and when a device that left by churn comes back.
    churn_seen: u64,
    away_until: Option<Instant>,
}

/// Whether device `i` leaves at churn `epoch`: `percent` % of the devices each time, a
/// different set each epoch, every device in turn (deterministic: a run's churn is the same
/// every time, and a small fleet has its share).
fn churns(i: usize, epoch: u64, percent: u64) -> bool {
    let Some(every) = 100u64.checked_div(percent.min(100)) else {
        return false;
    };
    // 97 is prime to 100 and to every `every` dividing it: neighbours leave epochs apart.
    (i as u64)
        .wrapping_mul(97)
        .wrapping_add(epoch)
        .is_multiple_of(every)
}

/// A DATA ticker whose first tick is at a random point of its interval (so the fleet's
/// DATA spread out); made again at every WELCOME.
fn ticker(interval: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(
        tokio::time::Instant::now() + interval.mul_f64(fastrand::f64()),
        interval,
    );
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

impl<'c> Driver<'c> {
    fn new(i: usize, ctx: &'c Ctx) -> Result<Driver<'c>, String> {
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
        let session =
            Session::new(&config, memory).map_err(|e| format!("device session: {e:?}"))?;
        let interval = Duration::from_secs_f64(1.0 / s.rate);
        Ok(Driver {
            d: Device {
                i,
                ctx,
                out: DeviceOutcome::default(),
                sent_at: VecDeque::new(),
                counter: (s.app == COUNTER_APP).then(CounterCheck::default),
                connected_at: None,
                dropped_at: None,
                welcomed_now: false,
            },
            session,
            stream: None,
            buf: vec![0u8; READ_CHUNK],
            payload: (0..s.payload).map(|b| (b ^ i) as u8).collect(),
            interval,
            ticker: ticker(interval),
            storm: ctx.live.storm.child_token(),
            stormed: false,
            churn_seen: ctx.live.churn.load(Ordering::Relaxed),
            away_until: None,
        })
    }

    /// Gives the events to the device's counts; a new session gets a new ticker.
    fn drain(&mut self) {
        while let Some(e) = self.session.poll_event() {
            if matches!(e, Event::Welcome { .. }) {
                self.ticker = ticker(self.interval);
            }
            self.d.see(e);
        }
    }

    fn now(&self) -> u64 {
        millis(self.d.ctx)
    }

    fn closed(&mut self) {
        self.stream = None;
        self.session.closed(self.now());
    }

    /// Dials; false when the run ended first.
    async fn connect(&mut self, give_up: impl Future<Output = ()>) -> bool {
        let ctx = self.d.ctx;
        let t0 = Instant::now();
        tokio::select! {
            r = dial(self.d.i, ctx) => match r {
                Ok(s) => {
                    ctx.live.dials.fetch_add(1, Ordering::Relaxed);
                    let mut h = ctx.hist.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = h.handshake.record(micros(t0.elapsed()));
                    drop(h);
                    self.stream = Some(s);
                    self.d.connected_at = Some(Instant::now());
                    self.session.connected(self.now());
                }
                Err(reason) => {
                    ctx.live.dial_failed(&reason);
                    self.d.out.failure = Some(reason);
                    self.closed();
                }
            },
            _ = give_up => {
                if self.d.out.failure.is_none() {
                    self.d.out.failure = Some(still_dialing(ctx));
                }
                return false;
            }
        }
        true
    }

    /// Writes what the session has.
    async fn write(&mut self) {
        let Some(io) = self.stream.as_mut() else {
            return self.closed();
        };
        let out = self.session.poll_send();
        let written = match io.write(out).await {
            Ok(n) if n > 0 => Some(n),
            _ => None,
        };
        if let Some(n) = written {
            self.session.sent(n);
        }
        let flushed =
            written.is_some() && (!self.session.poll_send().is_empty() || io.flush().await.is_ok());
        if !flushed {
            self.closed();
        }
    }

    /// Bytes read, fed to the session, its events taken.
    fn read(&mut self, n: usize) {
        let now = self.now();
        let mut at = 0;
        while at < n {
            at += self.session.feed(&self.buf[at..n], now);
            self.drain();
        }
    }

    /// A DATA tick: queue one.
    fn tick(&mut self) {
        match self.session.send_data(&self.payload) {
            Ok(_) => {
                self.d.sent_at.push_back(Instant::now());
                self.d.out.sent += 1;
                self.d.ctx.live.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(SendError::WindowFull) => {
                self.d.out.errors += 1;
                *self
                    .d
                    .out
                    .error_causes
                    .entry("window full: DATA not sent".into())
                    .or_default() += 1;
            }
            Err(e) => self.d.out.failure = Some(format!("send: {e:?}")),
        }
    }
}

/// One device: connect, send at the rate, reconnect (resending what was not answered), all
/// by the session's rules. `finish`: stop sending, wait (at most [`GRACE`]) for the replies,
/// end.
pub(crate) async fn device(i: usize, ctx: &Ctx, finish: &CancellationToken) -> DeviceOutcome {
    let mut dr = match Driver::new(i, ctx) {
        Ok(dr) => dr,
        Err(failure) => {
            return DeviceOutcome {
                failure: Some(failure),
                ..DeviceOutcome::default()
            };
        }
    };
    let send_until = ctx.start + ctx.settings.duration;
    let give_up = async {
        tokio::select! {
            _ = tokio::time::sleep_until((send_until + GRACE).into()) => {}
            _ = async { finish.cancelled().await; tokio::time::sleep(GRACE).await } => {}
        }
    };
    let mut give_up = std::pin::pin!(give_up);
    loop {
        dr.drain();
        if !dr.stormed && dr.storm.is_cancelled() {
            // The fleet's storm: a device on a session drops its connection (once); one
            // dialing or backing off at that instant just goes on.
            dr.stormed = true;
            if dr.d.welcomed_now {
                dr.closed();
                continue;
            }
        }
        let epoch = ctx.live.churn.load(Ordering::Relaxed);
        if epoch != dr.churn_seen {
            // Churn: a device on a session may leave for a while (its DATA still owed are
            // resent when it is back, from its ticket).
            dr.churn_seen = epoch;
            let percent = ctx.live.churn_percent.load(Ordering::Relaxed);
            if dr.d.welcomed_now && churns(dr.d.i, epoch, percent) {
                ctx.live.churned.fetch_add(1, Ordering::Relaxed);
                let away = Duration::from_millis(ctx.live.churn_away_ms.load(Ordering::Relaxed));
                dr.away_until = Some(Instant::now() + away);
                dr.closed();
                continue;
            }
        }
        let sending = Instant::now() < send_until && !finish.is_cancelled();
        if !sending && dr.session.owed() == 0 {
            break;
        }
        match dr.session.status() {
            Status::Done => break,
            Status::Close => dr.closed(),
            Status::Connect => {
                if let Some(back) = dr.away_until.take()
                    && back > Instant::now()
                {
                    tokio::select! {
                        _ = tokio::time::sleep_until(back.into()) => {}
                        _ = give_up.as_mut() => break,
                    }
                }
                if !dr.connect(give_up.as_mut()).await {
                    break;
                }
            }
            Status::Wait => {
                let until = dr.session.poll_timeout().unwrap_or(u64::MAX / 2);
                tokio::select! {
                    _ = tokio::time::sleep_until(at(ctx, until)) => dr.session.handle_timeout(dr.now()),
                    _ = give_up.as_mut() => break,
                }
            }
            Status::Connected if !dr.session.poll_send().is_empty() => dr.write().await,
            Status::Connected => {
                let Some(io) = dr.stream.as_mut() else {
                    dr.closed();
                    continue;
                };
                let timeout = dr.session.poll_timeout();
                let ticking = sending && dr.session.is_open();
                tokio::select! {
                    r = io.read(&mut dr.buf) => match r {
                        Ok(n) if n > 0 => dr.read(n),
                        _ => dr.closed(),
                    },
                    _ = dr.ticker.tick(), if ticking => dr.tick(),
                    _ = tokio::time::sleep_until(at(ctx, timeout.unwrap_or(u64::MAX / 2))), if timeout.is_some() => {
                        dr.session.handle_timeout(dr.now());
                    }
                    // The storm: handled at the loop's top, for every device at once.
                    _ = dr.storm.cancelled(), if !dr.stormed => {}
                    _ = finish.cancelled(), if sending => {}
                    _ = tokio::time::sleep_until(send_until.into()), if sending => {}
                    _ = give_up.as_mut() => break,
                }
            }
        }
    }
    dr.drain();
    let mut out = dr.d.out;
    if dr.d.welcomed_now {
        // Still connected at the end: leave the gateway in the spread, count as disconnected.
        ctx.live.connected_now.fetch_sub(1, Ordering::Relaxed);
    }
    out.lost += dr.session.owed();
    out.duplicated = dr.session.stats().duplicates;
    out
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
