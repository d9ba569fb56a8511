//! A model gateway, the application's checks, and a world of virtual time around a session.

extern crate std;

use std::vec;
use std::vec::Vec;

use wasmbed_protocol::{ErrorCode, Frame, Goaway, Hello, Kind, Resumed, Welcome};

use crate::{Cause, Config, Event, Resume, SendError, Session, Status};

/// One step of a world: what the device, the network, the gateway or time does next.
#[derive(Debug, Clone)]
pub enum Op {
    /// The app sends one DATA (if the window has room).
    Send,
    /// Up to n of the device's bytes reach the gateway.
    ToGateway(usize),
    /// Up to n of the gateway's bytes reach the device.
    ToDevice(usize),
    /// The connection breaks.
    Drop,
    /// The gateway says GOAWAY (and its last CHECKPOINT); closes once read, or never.
    Goaway(bool),
    /// Time passes (ms).
    Tick(u64),
    /// The next gateways refuse tickets (or take them again).
    RefuseTickets(bool),
}

const MAX: usize = 1 << 16;

/// A gateway for one connection: runs a counter app (its REPLY is the count of DATA the state
/// has seen), seals `(seq, count)` as its ticket, answers in order.
pub struct Gw {
    pub rx: Vec<u8>,
    pub out: Vec<u8>,
    /// The last DATA the state covers, and the count.
    pub last: u64,
    pub count: u64,
    pub checkpoint_every: u64,
    pub replies: u64,
    pub refuse_tickets: bool,
    /// GOAWAY sent: close once `out` is read.
    pub closing: bool,
    pub welcomed: bool,
}

pub fn ticket(seq: u64, count: u64) -> Vec<u8> {
    let mut t = b"tk".to_vec();
    t.extend_from_slice(&seq.to_le_bytes());
    t.extend_from_slice(&count.to_le_bytes());
    t
}

fn open_ticket(t: &[u8]) -> Option<(u64, u64)> {
    if t.len() != 18 || &t[..2] != b"tk" {
        return None;
    }
    Some((
        u64::from_le_bytes(t[2..10].try_into().ok()?),
        u64::from_le_bytes(t[10..18].try_into().ok()?),
    ))
}

impl Gw {
    pub fn new(checkpoint_every: u64, refuse_tickets: bool) -> Gw {
        Gw {
            rx: Vec::new(),
            out: Vec::new(),
            last: 0,
            count: 0,
            checkpoint_every: checkpoint_every.max(1),
            replies: 0,
            refuse_tickets,
            closing: false,
            welcomed: false,
        }
    }

    pub fn send(&mut self, f: Frame) {
        f.encode_into(&mut self.out);
    }

    pub fn input(&mut self, bytes: &[u8]) {
        if self.closing {
            return;
        }
        self.rx.extend_from_slice(bytes);
        while let Ok(Some((f, used))) = wasmbed_protocol::decode(&self.rx, MAX) {
            self.rx.drain(..used);
            self.handle(f);
        }
    }

    pub fn handle(&mut self, f: Frame) {
        match f.kind {
            Kind::Hello => {
                let h: Hello = f.decode_body("HELLO").expect("the device's HELLO");
                let t = h.resume.as_ref().and_then(|t| open_ticket(t));
                let resumed = match t {
                    Some((seq, count)) if !self.refuse_tickets => {
                        (self.last, self.count) = (seq, count);
                        Some(Resumed {
                            seq,
                            state: "restored".into(),
                        })
                    }
                    _ => None,
                };
                let refused = (h.resume.is_some() && resumed.is_none()).then(|| "expired".into());
                self.welcomed = true;
                self.send(Frame::control(
                    Kind::Welcome,
                    0,
                    &Welcome {
                        session: "s1".into(),
                        gateway: "g1".into(),
                        resumed,
                        resume_refused: refused,
                    },
                ));
            }
            Kind::Data if f.seq <= self.last => {
                self.send(ErrorCode::Duplicate.frame(f.seq, "covered"));
            }
            Kind::Data => {
                self.last = f.seq;
                self.count += 1;
                self.send(Frame::new(Kind::Reply, f.seq, self.count.to_le_bytes()));
                self.replies += 1;
                if self.replies.is_multiple_of(self.checkpoint_every) {
                    let c = wasmbed_protocol::Checkpoint {
                        ticket: serde_bytes::ByteBuf::from(ticket(self.last, self.count)),
                    };
                    self.send(Frame::control(Kind::Checkpoint, self.last, &c));
                }
            }
            Kind::Ping => self.send(Frame::new(Kind::Pong, f.seq, vec![])),
            _ => {}
        }
    }

    /// GOAWAY, the last CHECKPOINT, and a close once `out` is read (`close`), or a gateway
    /// that never closes (the device must leave by itself).
    pub fn goaway(&mut self, close: bool) {
        self.send(Frame::control(
            Kind::Goaway,
            0,
            &Goaway {
                reason: "drain".into(),
            },
        ));
        let c = wasmbed_protocol::Checkpoint {
            ticket: serde_bytes::ByteBuf::from(ticket(self.last, self.count)),
        };
        self.send(Frame::control(Kind::Checkpoint, self.last, &c));
        self.closing |= close;
    }
}

/// What the application saw, checked as it comes.
#[derive(Default, Debug)]
pub struct App {
    /// The last DATA with an answer event.
    pub answered: u64,
    pub replies: u64,
    pub lost: u64,
    pub covered: u64,
    /// A session started without the state (after the first).
    pub fresh_after_first: bool,
    pub welcomes: u64,
    pub disconnects: Vec<Cause>,
    pub checkpoints: u64,
    /// The peer may send anything ([`World::peer_bytes`]): its REPLYs are not the model
    /// gateway's counts, and only the session's own guarantees are checked.
    pub any_peer: bool,
}

impl App {
    pub fn see(&mut self, e: Event<'_>) {
        let answer = |app: &mut App, seq: u64| {
            assert_eq!(seq, app.answered + 1, "answers in order, once: {e:?}");
            app.answered = seq;
        };
        match e {
            Event::Reply { seq, body } => {
                answer(self, seq);
                self.replies += 1;
                if !self.any_peer {
                    let count = u64::from_le_bytes(body.try_into().expect("an 8-byte count"));
                    if !self.fresh_after_first {
                        assert_eq!(count, seq, "the state has every DATA exactly once");
                    }
                }
            }
            Event::Failed { seq, .. } => answer(self, seq),
            Event::Covered { seq } => {
                answer(self, seq);
                self.covered += 1;
            }
            Event::Lost { seq } => {
                answer(self, seq);
                self.lost += 1;
            }
            Event::Welcome { resume, .. } => {
                if self.welcomes > 0 && matches!(resume, Resume::New | Resume::Refused { .. }) {
                    self.fresh_after_first = true;
                }
                self.welcomes += 1;
            }
            Event::Disconnected { cause } => self.disconnects.push(cause),
            Event::Checkpoint { .. } => self.checkpoints += 1,
            Event::Push { .. } | Event::Goaway => {}
        }
    }
}

/// A device, its connection to a model gateway, and virtual time.
pub struct World {
    pub s: Session<Vec<u8>>,
    pub gw: Option<Gw>,
    pub app: App,
    pub now: u64,
    pub sent: u64,
    pub checkpoint_every: u64,
    pub refuse_tickets: bool,
}

impl World {
    pub fn new(config: &Config<'_>, checkpoint_every: u64) -> World {
        let mem = vec![0u8; Session::<Vec<u8>>::memory(config)];
        World {
            s: Session::new(config, mem).expect("a session"),
            gw: None,
            app: App::default(),
            now: 0,
            sent: 0,
            checkpoint_every,
            refuse_tickets: false,
        }
    }

    pub fn events(&mut self) {
        while let Some(e) = self.s.poll_event() {
            self.app.see(e);
        }
    }

    /// Connects or closes as the session asks.
    pub fn service(&mut self) {
        match self.s.status() {
            Status::Connect => {
                self.gw = Some(Gw::new(self.checkpoint_every, self.refuse_tickets));
                self.s.connected(self.now);
            }
            Status::Close => {
                self.gw = None;
                self.s.closed(self.now);
            }
            _ => {}
        }
        self.events();
    }

    pub fn send(&mut self) {
        match self.s.send_data(b"x") {
            Ok(seq) => {
                assert_eq!(seq, self.sent + 1);
                self.sent = seq;
            }
            Err(SendError::WindowFull) => {}
            Err(e) => panic!("{e:?}"),
        }
    }

    pub fn deliver_up(&mut self, max: usize) {
        let Some(gw) = self.gw.as_mut() else { return };
        let out = self.s.poll_send();
        let n = out.len().min(max);
        gw.input(&out[..n]);
        self.s.sent(n);
    }

    pub fn deliver_down(&mut self, max: usize) {
        let Some(gw) = self.gw.as_mut() else { return };
        let n = gw.out.len().min(max);
        let bytes: Vec<u8> = gw.out.drain(..n).collect();
        let closes = gw.closing && gw.out.is_empty();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let took = self.s.feed(rest, self.now);
            rest = &rest[took..];
            self.events();
        }
        if closes {
            self.drop_connection();
        }
    }

    pub fn drop_connection(&mut self) {
        if self.gw.take().is_some() {
            self.s.closed(self.now);
            self.events();
        }
    }

    pub fn tick(&mut self, ms: u64) {
        self.now += ms;
        self.s.handle_timeout(self.now);
        self.events();
    }

    /// Connects or closes as the session asks, then does `op`.
    pub fn apply(&mut self, op: Op) {
        self.service();
        match op {
            Op::Send => self.send(),
            Op::ToGateway(n) => self.deliver_up(n),
            Op::ToDevice(n) => self.deliver_down(n),
            Op::Drop => self.drop_connection(),
            Op::Goaway(close) => {
                if let Some(gw) = self.gw.as_mut() {
                    gw.goaway(close)
                }
            }
            Op::Tick(ms) => self.tick(ms),
            Op::RefuseTickets(r) => self.refuse_tickets = r,
        }
    }

    /// Gateways take tickets again and the world settles: every DATA sent got exactly one
    /// answer event, in order (checked as they came), none was lost, none was a duplicate.
    pub fn finish(&mut self) {
        self.refuse_tickets = false;
        self.settle();
        assert_eq!(self.app.answered, self.sent, "every DATA answered");
        assert_eq!(self.app.lost, 0, "DATA lost");
        assert_eq!(self.s.stats().duplicates, 0, "duplicates");
    }

    /// Bytes from a peer that may send anything, fed while the connection is open; then the
    /// app sends and the session writes. The session must not panic, and keeps to its memory
    /// (it has no other).
    pub fn peer_bytes(&mut self, bytes: &[u8]) {
        self.app.any_peer = true;
        let mut rest = bytes;
        while !rest.is_empty() && self.s.status() == Status::Connected {
            let took = self.s.feed(rest, self.now);
            rest = &rest[took..];
            self.events();
        }
        self.send();
        // Written: the DATA waits for its answer, so what the peer sends next meets the
        // accepting paths (an answer, a CHECKPOINT covering it, a resume), not only the
        // drop of answers to DATA never written.
        let n = self.s.poll_send().len();
        self.s.sent(n);
    }

    /// Runs until every DATA has its answer event (bounded).
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            if self.s.owed() == 0 {
                return;
            }
            self.service();
            let quiet =
                self.s.poll_send().is_empty() && self.gw.as_ref().is_none_or(|g| g.out.is_empty());
            let status = self.s.status();
            if status == Status::Wait || (status == Status::Connected && quiet) {
                // Nothing moves: time does (a backoff ends, a silent peer is left).
                let t = self.s.poll_timeout().expect("a session waiting on time");
                self.tick(t.saturating_sub(self.now));
            }
            self.deliver_up(usize::MAX);
            self.deliver_down(usize::MAX);
        }
        panic!("not settled: {} owed, {:?}", self.s.owed(), self.app);
    }
}
