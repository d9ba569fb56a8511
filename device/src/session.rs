//! The state machine: a session's phase, its memory and its connection. What
//! comes in is in `recv` (one frame at a time, as events), what goes out in `send`; where
//! things live in the caller's memory is in `memory`.

mod memory;
mod recv;
mod send;

use wasmbed_protocol::body::HelloRef;
use wasmbed_protocol::{HEADER, Kind, PREFIX, header_bytes};

use self::memory::Layout;
use self::send::Source;
use crate::window::Window;
use crate::{Action, Cause, Config, SendError, SetupError, Status};

/// Where the session is with its connection. Times are the caller's milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Backing off until `until`.
    Wait { until: u64 },
    /// A connection should open.
    Connect,
    /// Connected: HELLO is going (`tx` bytes of it written), WELCOME is awaited.
    Hello { since: u64, tx: usize },
    /// WELCOME came: DATA goes, answers come.
    Open,
    /// GOAWAY came at `since`: nothing new goes; the answers owed still come.
    Leaving { since: u64 },
    /// The connection must close, for `cause`.
    Close { cause: Cause },
    /// Given up.
    Done,
}

/// Counts of what the session saw and set aside (the events say the rest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Answers for a DATA this connection never wrote: dropped.
    pub unsent_answers: u64,
    /// CHECKPOINTs covering DATA this connection never wrote: dropped.
    pub unsent_checkpoints: u64,
    /// Answers the peer sent for a DATA already answered, other than a replay: dropped.
    pub duplicates: u64,
    /// Second answers to DATA resent after a resume for their effect on the state: dropped
    /// (expected).
    pub replays: u64,
    /// DATA written again on a new connection.
    pub resent: u64,
    /// Answered DATA dropped from a full window before a ticket covered it (the ticket
    /// before it was dropped too: a resume could not replay it).
    pub evictions: u64,
    /// CHECKPOINTs older than the ticket kept.
    pub stale_checkpoints: u64,
    /// CHECKPOINTs whose ticket is over [`Config::max_ticket`].
    pub oversized_tickets: u64,
    /// PINGs or PONGs not sent: the peer sent PINGs faster than they could go.
    pub dropped_control: u64,
}

/// Control frames waiting to go (PINGs, PONGs): at most this many.
const CTL_FRAMES: usize = 4;
const CTL: usize = CTL_FRAMES * (PREFIX + HEADER);

/// What one connection holds; a new connection starts from nothing.
struct Conn {
    /// Received bytes not yet read (`rx[start..end]`), and the frame the last event
    /// borrowed (consumed on the next call).
    rx_start: usize,
    rx_end: usize,
    delivered: usize,
    /// PINGs and PONGs to write (`control[tx..len]`).
    control: [u8; CTL],
    control_len: usize,
    control_tx: usize,
    last_rx: u64,
    /// Our PING in flight: its sequence and when it went.
    ping: Option<(u64, u64)>,
    /// The highest DATA answered on this connection.
    answered: u64,
    /// An answer came on it (a reconnect after it goes at once).
    progress: bool,
    /// WELCOME came on it.
    welcomed: bool,
    /// What the last `poll_send` gave: from where, how many bytes.
    handed: Option<(Source, usize)>,
}

impl Conn {
    fn new(now: u64) -> Conn {
        Conn {
            rx_start: 0,
            rx_end: 0,
            delivered: 0,
            control: [0; CTL],
            control_len: 0,
            control_tx: 0,
            last_rx: now,
            ping: None,
            answered: 0,
            progress: false,
            welcomed: false,
            handed: None,
        }
    }
}

/// One device session. `B` is the memory: `&mut [u8]` on a device, a `Vec<u8>` elsewhere.
pub struct Session<B> {
    mem: B,
    layout: Layout,
    max_frame: usize,
    max_ticket: usize,
    keepalive: u64,
    answer_timeout: u64,
    first_backoff: u64,
    max_backoff: u64,
    rng: u64,
    backoff: u64,
    phase: Phase,
    /// The HELLO frame's length in its region; the ticket in it (offset, length, the DATA it
    /// covers).
    hello_len: usize,
    ticket: Option<(usize, usize, u64)>,
    window: Window,
    /// Answers: events were given for every DATA up to `answered`; `covered_to` and
    /// `lost_to` (when above it) are owed as `Covered` and `Lost` events first.
    answered: u64,
    covered_to: u64,
    lost_to: u64,
    /// DATA resent after a resume whose second answer is expected (`lo < seq <= hi`).
    replay: (u64, u64),
    /// The highest DATA ever wholly written (on any connection).
    written: u64,
    welcomes: u64,
    /// A connection was made ([`Session::connected`]): no ticket is restored any more.
    connected_once: bool,
    conn: Conn,
    note: Option<Cause>,
    stats: Stats,
}

impl<B: AsMut<[u8]> + AsRef<[u8]>> Session<B> {
    /// The bytes of memory a session with `config` needs (`usize::MAX`: none is enough, or
    /// a config [`Session::new`] refuses).
    pub fn memory(config: &Config<'_>) -> usize {
        Self::layout(config).map_or(usize::MAX, |l| l.total())
    }

    /// Where a session with `config` lives; `None` for a config that cannot make one.
    fn layout(config: &Config<'_>) -> Option<Layout> {
        let refused = config.device.is_empty()
            || config.app.is_empty()
            || config.window < PREFIX + HEADER
            || config.max_frame < HEADER;
        if refused { None } else { Layout::of(config) }
    }

    /// A session in `mem` (at least [`Session::memory`] bytes), ready to connect.
    pub fn new(config: &Config<'_>, mut mem: B) -> Result<Session<B>, SetupError> {
        let layout = Self::layout(config).ok_or(SetupError::Config)?;
        let given = mem.as_mut().len();
        if given < layout.total() {
            return Err(SetupError::Memory {
                needed: layout.total(),
                given,
            });
        }
        let (device, app) = layout.names();
        mem.as_mut()[device].copy_from_slice(config.device.as_bytes());
        mem.as_mut()[app].copy_from_slice(config.app.as_bytes());
        let first_backoff = config.first_backoff_ms.max(1);
        let mut s = Session {
            mem,
            layout,
            max_frame: config.max_frame,
            max_ticket: config.max_ticket,
            keepalive: config.keepalive_ms,
            answer_timeout: config.answer_timeout_ms,
            first_backoff,
            max_backoff: config.max_backoff_ms.max(first_backoff),
            rng: config.seed | 1,
            backoff: first_backoff,
            phase: Phase::Connect,
            hello_len: 0,
            ticket: None,
            window: Window::new(1),
            answered: 0,
            covered_to: 0,
            lost_to: 0,
            replay: (0, 0),
            written: 0,
            welcomes: 0,
            connected_once: false,
            conn: Conn::new(0),
            note: None,
            stats: Stats::default(),
        };
        s.write_hello(None);
        Ok(s)
    }

    /// The window and its region of memory.
    fn window(&mut self) -> (&mut Window, &mut [u8]) {
        let at = self.layout.window();
        (&mut self.window, &mut self.mem.as_mut()[at])
    }

    /// Writes HELLO into its region, with the ticket that sits in `rx[at..at + len]` and
    /// covers DATA up to `seq` (a CHECKPOINT's), or with none. Never while HELLO is going.
    fn write_hello(&mut self, ticket: Option<(usize, usize, u64)>) {
        let p = self.layout.parts(self.mem.as_mut());
        let (head, body) = p.hello.split_at_mut(PREFIX + HEADER);
        let hello = HelloRef {
            device: p.device,
            app: p.app,
            resume: ticket.map(|(at, len, _)| &p.rx[at..at + len]),
        };
        // The region is sized for the largest ticket kept (`HelloRef::max_len`).
        let n = hello.encode(body).unwrap_or(0);
        head.copy_from_slice(&header_bytes(Kind::Hello, 0, n));
        self.hello_len = PREFIX + HEADER + n;
        self.ticket = ticket.map(|(_, len, seq)| (self.hello_len - len, len, seq));
    }

    fn drop_ticket(&mut self) {
        if self.ticket.is_some() {
            self.write_hello(None);
        }
    }

    /// What the transport should do now.
    pub fn status(&self) -> Status {
        match self.phase {
            Phase::Wait { .. } => Status::Wait,
            Phase::Connect => Status::Connect,
            Phase::Hello { .. } | Phase::Open | Phase::Leaving { .. } => Status::Connected,
            Phase::Close { .. } => Status::Close,
            Phase::Done => Status::Done,
        }
    }

    /// Whether a session is open for new DATA to go at once (WELCOME came, no GOAWAY).
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// The latest ticket and the last DATA it covers: keep it across a reboot
    /// ([`Session::restore`]).
    pub fn ticket(&self) -> Option<(u64, &[u8])> {
        let (at, len, seq) = self.ticket?;
        Some((seq, &self.mem.as_ref()[self.layout.hello()][at..at + len]))
    }

    /// A ticket kept across a reboot, before any DATA and any connection: the next
    /// connection resumes from it, and DATA goes on after `seq`. False (nothing changed)
    /// otherwise (DATA queued, or a connection made, even one since closed), or when the
    /// ticket is over [`Config::max_ticket`] or longer than a frame ([`Config::max_frame`]).
    pub fn restore(&mut self, seq: u64, ticket: &[u8]) -> bool {
        let idle = matches!(self.phase, Phase::Connect | Phase::Wait { .. });
        // A ticket longer than a frame (`max_ticket` over `max_frame`) could never have come
        // in a CHECKPOINT, and would not fit the rx region it goes through.
        let fits = ticket.len() <= self.max_ticket && ticket.len() <= self.layout.rx().len();
        if !idle || self.connected_once || self.window.next() != 1 || !fits || seq >= u64::MAX / 2 {
            return false;
        }
        self.window = Window::new(seq + 1);
        (self.answered, self.covered_to, self.lost_to) = (seq, seq, seq);
        self.written = seq;
        // Into HELLO by way of the rx region, free while no connection is open (the rx
        // region holds a frame, so a ticket of at most `max_ticket` fits).
        self.layout.parts(self.mem.as_mut()).rx[..ticket.len()].copy_from_slice(ticket);
        self.write_hello(Some((0, ticket.len(), seq)));
        true
    }

    /// DATA the application gave that has no answer event yet.
    pub fn owed(&self) -> u64 {
        self.window.next() - 1 - self.answered
    }

    /// The sequence the next DATA gets.
    pub fn next_seq(&self) -> u64 {
        self.window.next()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Queues DATA `body`; its sequence. It goes when a session is open and stays in the
    /// window until a ticket covers it.
    pub fn send_data(&mut self, body: &[u8]) -> Result<u64, SendError> {
        if self.phase == Phase::Done {
            return Err(SendError::Done);
        }
        if PREFIX + HEADER + body.len() > self.layout.window().len() {
            return Err(SendError::TooLarge);
        }
        loop {
            let seq = self.window.next();
            let (window, mem) = self.window();
            if window.push(mem, body) {
                return Ok(seq);
            }
            // Room is made only from DATA answered and written on this open connection (never
            // while HELLO is going: the ticket may change with it); a resume from the ticket
            // could no longer replay it, so the ticket goes too.
            let first = self.window.lo;
            let open = matches!(self.phase, Phase::Open | Phase::Leaving { .. });
            if !open || first > self.answered || !self.window.first_is_written() {
                return Err(SendError::WindowFull);
            }
            let (window, mem) = self.window();
            window.prune(mem, first);
            self.stats.evictions += 1;
            if self.ticket.is_some_and(|t| t.2 < first) {
                self.drop_ticket();
            }
        }
    }

    /// A connection is open (TLS done): HELLO goes first.
    pub fn connected(&mut self, now: u64) {
        if self.phase == Phase::Done {
            return;
        }
        self.connected_once = true;
        self.phase = Phase::Hello { since: now, tx: 0 };
        self.conn = Conn::new(now);
        self.window.new_connection();
    }

    /// The connection ended (closed by either side, failed, or never opened).
    pub fn closed(&mut self, now: u64) {
        let cause = match self.phase {
            Phase::Done | Phase::Wait { .. } => return,
            Phase::Close { cause } => cause,
            Phase::Leaving { .. } => Cause::Goaway,
            _ => Cause::Closed,
        };
        self.note = Some(cause);
        let conn = core::mem::replace(&mut self.conn, Conn::new(now));
        self.window.new_connection();
        let action = match cause {
            Cause::Refused { action, .. } => action,
            _ => Action::Retry,
        };
        match action {
            Action::GiveUp => {
                self.phase = Phase::Done;
                self.lost_to = self.window.next() - 1;
                return;
            }
            Action::Fresh => self.drop_ticket(),
            Action::Retry => {}
        }
        // After a session that answered, or that said GOAWAY, reconnect at once.
        let at_once =
            conn.welcomed && (cause == Cause::Goaway || (cause == Cause::Closed && conn.progress));
        if at_once {
            self.backoff = self.first_backoff;
            self.phase = Phase::Connect;
            return;
        }
        // xorshift64*: jitter of up to half the wait, so a fleet does not come back in step.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let wait = self.backoff + r % (self.backoff / 2 + 1);
        self.backoff = self.backoff.saturating_mul(2).min(self.max_backoff);
        self.phase = Phase::Wait {
            until: now.saturating_add(wait),
        };
    }

    /// When [`Session::handle_timeout`] is due; `None`: not until something happens.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.phase {
            Phase::Wait { until } => Some(until),
            Phase::Hello { since, .. } | Phase::Leaving { since } => {
                Some(since.saturating_add(self.answer_timeout))
            }
            Phase::Open if self.keepalive > 0 => Some(match self.conn.ping {
                Some((_, at)) => at.saturating_add(self.keepalive),
                None => self.conn.last_rx.saturating_add(self.keepalive),
            }),
            _ => None,
        }
    }

    /// The time is `now`: back-off ends, answers overdue, keep-alive.
    pub fn handle_timeout(&mut self, now: u64) {
        if self.poll_timeout().is_none_or(|t| now < t) {
            return;
        }
        match self.phase {
            Phase::Wait { .. } => self.phase = Phase::Connect,
            Phase::Hello { .. } | Phase::Leaving { .. } => self.close(Cause::Silent),
            Phase::Open => match self.conn.ping {
                Some(_) => self.close(Cause::Silent),
                None => {
                    // Any sequence: it is the bytes coming back that show the peer alive.
                    self.conn.ping = Some((now, now));
                    self.queue_control(Kind::Ping, now);
                }
            },
            _ => {}
        }
    }

    fn close(&mut self, cause: Cause) {
        if self.phase != Phase::Done {
            self.phase = Phase::Close { cause };
        }
    }
}
