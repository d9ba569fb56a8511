//! The state machine: a session's phase, its memory, and what goes out. What comes in is in
//! `recv` (one frame at a time, as events).

mod recv;

use wasmbed_protocol::body::HelloRef;
use wasmbed_protocol::{HEADER, Kind, PREFIX, header_bytes};

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
    /// Answers for a DATA never sent, or CHECKPOINTs beyond what was sent: dropped.
    pub ignored: u64,
    /// Answers the peer sent twice on one connection: dropped.
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
    /// PONGs not sent: the peer sent PINGs faster than they could go.
    pub dropped_pongs: u64,
}

/// Where each part lives in the caller's memory: `[names | hello | window | rx]`.
#[derive(Debug, Clone, Copy)]
struct Layout {
    device: usize,
    app: usize,
    hello: usize,
    window: usize,
    rx: usize,
}

impl Layout {
    fn of(c: &Config<'_>) -> Layout {
        Layout {
            device: c.device.len(),
            app: c.app.len(),
            hello: PREFIX + HEADER + HelloRef::max_len(c.device.len(), c.app.len(), c.max_ticket),
            window: c.window,
            rx: PREFIX + c.max_frame,
        }
    }

    fn total(&self) -> usize {
        self.device + self.app + self.hello + self.window + self.rx
    }
}

/// The parts of the caller's memory, borrowed apart.
struct Parts<'m> {
    device: &'m str,
    app: &'m str,
    hello: &'m mut [u8],
    rx: &'m mut [u8],
}

/// Control frames waiting to go (PINGs, PONGs): at most this many.
const CTL_FRAMES: usize = 4;

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
    /// The HELLO frame's length in `hello`; the ticket in it (offset, length, the DATA it
    /// covers).
    hello_len: usize,
    ticket: Option<(usize, usize, u64)>,
    window: Window,
    /// Answers: events were given for every DATA up to `answered`; `covered_to` and
    /// `lost_to` (when above it) are owed as `Covered` and `Lost` events first.
    answered: u64,
    covered_to: u64,
    lost_to: u64,
    /// This connection: the highest sequence answered on it, and whether it answered any.
    conn_answered: u64,
    progress: bool,
    /// Received bytes not yet read (`rx[start..end]`), and the frame the last event
    /// borrowed (consumed on the next call).
    rx_start: usize,
    rx_end: usize,
    delivered: usize,
    ctl: [u8; CTL_FRAMES * (PREFIX + HEADER)],
    ctl_len: usize,
    ctl_tx: usize,
    last_rx: u64,
    ping: Option<(u64, u64)>,
    pings: u64,
    note: Option<Cause>,
    stats: Stats,
}

impl<B: AsMut<[u8]> + AsRef<[u8]>> Session<B> {
    /// The bytes of memory a session with `config` needs.
    pub fn memory(config: &Config<'_>) -> usize {
        Layout::of(config).total()
    }

    /// A session in `mem` (at least [`Session::memory`] bytes), ready to connect.
    pub fn new(config: &Config<'_>, mut mem: B) -> Result<Session<B>, SetupError> {
        if config.device.is_empty()
            || config.app.is_empty()
            || config.window < PREFIX + HEADER
            || config.max_frame < HEADER
        {
            return Err(SetupError::Config);
        }
        let layout = Layout::of(config);
        let given = mem.as_mut().len();
        if given < layout.total() {
            return Err(SetupError::Memory {
                needed: layout.total(),
                given,
            });
        }
        let names = &mut mem.as_mut()[..layout.device + layout.app];
        names[..layout.device].copy_from_slice(config.device.as_bytes());
        names[layout.device..].copy_from_slice(config.app.as_bytes());
        let mut s = Session {
            mem,
            layout,
            max_frame: config.max_frame,
            max_ticket: config.max_ticket,
            keepalive: config.keepalive_ms,
            answer_timeout: config.answer_timeout_ms,
            first_backoff: config.first_backoff_ms.max(1),
            max_backoff: config.max_backoff_ms.max(config.first_backoff_ms.max(1)),
            rng: config.seed | 1,
            backoff: config.first_backoff_ms.max(1),
            phase: Phase::Connect,
            hello_len: 0,
            ticket: None,
            window: Window::new(1),
            answered: 0,
            covered_to: 0,
            lost_to: 0,
            conn_answered: 0,
            progress: false,
            rx_start: 0,
            rx_end: 0,
            delivered: 0,
            ctl: [0; CTL_FRAMES * (PREFIX + HEADER)],
            ctl_len: 0,
            ctl_tx: 0,
            last_rx: 0,
            ping: None,
            pings: 0,
            note: None,
            stats: Stats::default(),
        };
        s.write_hello(None);
        Ok(s)
    }

    fn parts(&mut self) -> Parts<'_> {
        let l = self.layout;
        let (names, rest) = self.mem.as_mut().split_at_mut(l.device + l.app);
        let (hello, rest) = rest.split_at_mut(l.hello);
        let rest = &mut rest[l.window..];
        let (device, app) = names.split_at(l.device);
        Parts {
            // Copied from `&str`s in `new`: valid UTF-8.
            device: core::str::from_utf8(device).unwrap_or_default(),
            app: core::str::from_utf8(app).unwrap_or_default(),
            hello,
            rx: &mut rest[..l.rx],
        }
    }

    /// The window and its region of memory.
    fn window(&mut self) -> (&mut Window, &mut [u8]) {
        let l = self.layout;
        let mem = &mut self.mem.as_mut()[l.device + l.app + l.hello..][..l.window];
        (&mut self.window, mem)
    }

    /// Writes HELLO into its region, with the ticket that sits in `rx[at..at + len]` and
    /// covers DATA up to `seq` (a CHECKPOINT's), or with none.
    fn write_hello(&mut self, ticket: Option<(usize, usize, u64)>) {
        let p = self.parts();
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

    /// The latest ticket and the last DATA it covers: keep it across a reboot
    /// ([`Session::restore`]).
    pub fn ticket(&self) -> Option<(u64, &[u8])> {
        let (at, len, seq) = self.ticket?;
        let hello = &self.mem.as_ref()[self.layout.device + self.layout.app..];
        Some((seq, &hello[at..at + len]))
    }

    /// A ticket kept across a reboot, before anything is sent: the next connection resumes
    /// from it, and DATA goes on after `seq`. False (nothing changed) when DATA was already
    /// given or the ticket is over [`Config::max_ticket`].
    pub fn restore(&mut self, seq: u64, ticket: &[u8]) -> bool {
        if self.window.next() != 1 || ticket.len() > self.max_ticket || seq == u64::MAX {
            return false;
        }
        self.window = Window::new(seq + 1);
        (self.answered, self.covered_to, self.lost_to) = (seq, seq, seq);
        // The ticket is copied into the HELLO region by way of the rx region, which is free
        // before a connection.
        if ticket.len() > self.layout.rx {
            return false;
        }
        self.parts().rx[..ticket.len()].copy_from_slice(ticket);
        self.write_hello(Some((0, ticket.len(), seq)));
        true
    }

    fn drop_ticket(&mut self) {
        if self.ticket.is_some() {
            self.write_hello(None);
        }
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
        if PREFIX + HEADER + body.len() > self.layout.window {
            return Err(SendError::TooLarge);
        }
        loop {
            let seq = self.window.next();
            let (window, mem) = self.window();
            if window.push(mem, body) {
                return Ok(seq);
            }
            // Room is made only from DATA answered and written on this connection; a resume
            // from the ticket could no longer replay it, so the ticket goes too.
            let first = self.window.lo;
            if first > self.answered || !self.window.first_is_written() {
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
        if matches!(self.phase, Phase::Done) {
            return;
        }
        self.phase = Phase::Hello { since: now, tx: 0 };
        (self.rx_start, self.rx_end, self.delivered) = (0, 0, 0);
        (self.ctl_len, self.ctl_tx) = (0, 0);
        self.ping = None;
        self.last_rx = now;
        self.conn_answered = 0;
        self.progress = false;
    }

    /// The connection ended (closed by either side, failed, or never opened).
    pub fn closed(&mut self, now: u64) {
        let cause = match self.phase {
            Phase::Done => return,
            Phase::Close { cause } => cause,
            Phase::Leaving { .. } => Cause::Goaway,
            _ => Cause::Closed,
        };
        self.note = Some(cause);
        (self.rx_start, self.rx_end, self.delivered) = (0, 0, 0);
        (self.ctl_len, self.ctl_tx) = (0, 0);
        self.ping = None;
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
        let at_once = cause == Cause::Goaway || (cause == Cause::Closed && self.progress);
        self.progress = false;
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
        self.backoff = (self.backoff.saturating_mul(2)).min(self.max_backoff);
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
            Phase::Open if self.keepalive > 0 => Some(match self.ping {
                Some((_, at)) => at.saturating_add(self.keepalive),
                None => self.last_rx.saturating_add(self.keepalive),
            }),
            _ => None,
        }
    }

    /// The time is `now`: back-off ends, answers overdue, keep-alive.
    pub fn handle_timeout(&mut self, now: u64) {
        let due = self.poll_timeout().is_some_and(|t| now >= t);
        if !due {
            return;
        }
        match self.phase {
            Phase::Wait { .. } => self.phase = Phase::Connect,
            Phase::Hello { .. } => self.close(Cause::Silent),
            Phase::Leaving { .. } => self.close(Cause::Goaway),
            Phase::Open => match self.ping {
                Some(_) => self.close(Cause::Silent),
                None => {
                    self.pings += 1;
                    self.ping = Some((self.pings, now));
                    self.queue_ctl(Kind::Ping, self.pings);
                }
            },
            _ => {}
        }
    }

    fn close(&mut self, cause: Cause) {
        if !matches!(self.phase, Phase::Done) {
            self.phase = Phase::Close { cause };
        }
    }

    fn queue_ctl(&mut self, kind: Kind, seq: u64) {
        if self.ctl_tx == self.ctl_len {
            (self.ctl_len, self.ctl_tx) = (0, 0);
        }
        let n = PREFIX + HEADER;
        if self.ctl.len() - self.ctl_len < n {
            self.stats.dropped_pongs += 1;
            return;
        }
        self.ctl[self.ctl_len..self.ctl_len + n].copy_from_slice(&header_bytes(kind, seq, 0));
        self.ctl_len += n;
    }

    /// Where the next bytes to write come from.
    fn source(&self) -> Source {
        let ctl = self.ctl_tx < self.ctl_len;
        match self.phase {
            Phase::Hello { tx, .. } if tx < self.hello_len => Source::Hello(tx),
            Phase::Hello { .. } if ctl => Source::Ctl,
            Phase::Open | Phase::Leaving { .. } if ctl && self.window.at_boundary() => Source::Ctl,
            Phase::Open => Source::Window(true),
            Phase::Leaving { .. } => Source::Window(false),
            _ => Source::None,
        }
    }

    /// Bytes to write to the connection now (empty: nothing); then [`Session::sent`].
    pub fn poll_send(&mut self) -> &[u8] {
        let source = self.source();
        let l = self.layout;
        let mem = self.mem.as_ref();
        match source {
            Source::Hello(tx) => &mem[l.device + l.app..][tx..self.hello_len],
            Source::Ctl => &self.ctl[self.ctl_tx..self.ctl_len],
            Source::Window(more) => {
                let window = &mem[l.device + l.app + l.hello..][..l.window];
                self.window.unsent(window, more)
            }
            Source::None => &[],
        }
    }

    /// `n` bytes of what [`Session::poll_send`] gave were written.
    pub fn sent(&mut self, n: usize) {
        match self.source() {
            Source::Hello(tx) => {
                if let Phase::Hello { since, .. } = self.phase {
                    let tx = (tx + n).min(self.hello_len);
                    self.phase = Phase::Hello { since, tx };
                }
            }
            Source::Ctl => self.ctl_tx = (self.ctl_tx + n).min(self.ctl_len),
            Source::Window(_) => {
                let l = self.layout;
                let window = &self.mem.as_ref()[l.device + l.app + l.hello..][..l.window];
                self.window.sent(window, n);
            }
            Source::None => {}
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Hello(usize),
    Ctl,
    Window(bool),
    None,
}
