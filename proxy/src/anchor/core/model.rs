//! A model of one anchored session for tests and fuzzing: a model device (DATA with
//! increasing sequences, PINGs) and model gateways (each answers DATA in order, checkpoints at a
//! cadence, pushes, may say GOAWAY, crash, stop answering, or lose what is in flight) around one
//! [`Core`], driven by [`Op`]s. [`World::check`] asserts the invariants after every step;
//! [`World::finish`] and [`World::verdict`] the end state.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio_util::codec::Decoder;
use wasmbed_protocol::codec::FrameCodec;
use wasmbed_protocol::{Checkpoint, Frame, Hello, Kind, Resumed, Welcome};

use super::*;

pub const WINDOW: usize = 600;

/// A gateway's session: the app is a counter; tickets carry `(last DATA, count)`.
pub struct Gateway {
    pub last: u64,
    pub count: u64,
    pub pushes: u64,
    pub codec: FrameCodec,
    pub inbox: BytesMut,
    /// Frames sent towards the proxy, not yet delivered (lost if the gateway crashes).
    pub outbox: VecDeque<Frame>,
    /// Checkpoint after every `cadence`-th REPLY (0: never: no key ring).
    pub cadence: u64,
    pub replies: u64,
    /// It said GOAWAY: it answers what it has, then closes.
    pub going: bool,
    /// It stopped answering (hung): nothing it gets is answered.
    pub hung: bool,
}

pub fn ticket(last: u64, count: u64) -> Vec<u8> {
    [last.to_be_bytes(), count.to_be_bytes()].concat()
}

impl Gateway {
    /// A gateway that got `hello`: resumes from its ticket when it has the key ring.
    pub fn open(hello: &[u8], cadence: u64) -> (Gateway, Welcome) {
        let mut buf = BytesMut::from(hello);
        let frame = FrameCodec::new(DEFAULT_MAX_FRAME)
            .decode(&mut buf)
            .unwrap()
            .unwrap();
        let hello: Hello = frame.decode_body("HELLO").unwrap();
        let mut gw = Gateway {
            last: 0,
            count: 0,
            pushes: 0,
            codec: FrameCodec::new(DEFAULT_MAX_FRAME),
            inbox: BytesMut::new(),
            outbox: VecDeque::new(),
            cadence,
            replies: 0,
            going: false,
            hung: false,
        };
        let resumed = match (&hello.resume, cadence) {
            (Some(t), 1..) => {
                gw.last = u64::from_be_bytes(t[..8].try_into().unwrap());
                gw.count = u64::from_be_bytes(t[8..].try_into().unwrap());
                Some(Resumed {
                    seq: gw.last,
                    state: "restored".into(),
                })
            }
            _ => None,
        };
        let welcome = Welcome {
            session: "s".into(),
            gateway: "g".into(),
            resume_refused: (hello.resume.is_some() && resumed.is_none())
                .then(|| "bad_ticket".into()),
            resumed,
        };
        (gw, welcome)
    }

    /// Takes bytes from the proxy and answers the whole frames among them.
    pub fn take(&mut self, bytes: &[u8]) {
        self.inbox.extend_from_slice(bytes);
        while let Some(f) = self.codec.decode(&mut self.inbox).unwrap() {
            if self.hung {
                continue;
            }
            match f.kind {
                Kind::Data if f.seq > self.last => {
                    self.last = f.seq;
                    self.count += 1;
                    self.outbox.push_back(Frame::new(
                        Kind::Reply,
                        f.seq,
                        self.count.to_be_bytes().to_vec(),
                    ));
                    self.replies += 1;
                    if self.cadence > 0 && self.replies.is_multiple_of(self.cadence) {
                        let c = Checkpoint {
                            ticket: serde_bytes::ByteBuf::from(ticket(self.last, self.count)),
                        };
                        self.outbox
                            .push_back(Frame::control(Kind::Checkpoint, self.last, &c));
                    }
                }
                Kind::Data => panic!("DATA {} replayed at or below {}", f.seq, self.last),
                Kind::Ping => self.outbox.push_back(Frame::new(Kind::Pong, f.seq, [])),
                Kind::Pong => {}
                other => panic!("the proxy sent a gateway {other:?}"),
            }
        }
    }
}

/// The device: what it sent, what it got.
#[derive(Default)]
pub struct Device {
    pub sent: u64,
    pub answers: Vec<(u64, u64)>,
    pub pushes: Vec<u64>,
    pub codec: Option<FrameCodec>,
    pub inbox: BytesMut,
    pub welcomed: bool,
    /// PINGs sent and not answered yet.
    pub pinged: std::collections::BTreeSet<u64>,
    pub next_ping: u64,
}

impl Device {
    pub fn take(&mut self, bytes: &[u8]) {
        self.inbox.extend_from_slice(bytes);
        let codec = self
            .codec
            .get_or_insert_with(|| FrameCodec::new(DEFAULT_MAX_FRAME));
        while let Some(f) = codec.decode(&mut self.inbox).unwrap() {
            match f.kind {
                Kind::Welcome => {
                    assert!(!self.welcomed, "a second WELCOME reached the device");
                    self.welcomed = true;
                }
                Kind::Reply => {
                    assert!(f.seq <= self.sent, "answer to DATA {} never sent", f.seq);
                    if let Some(&(last, _)) = self.answers.last() {
                        assert!(f.seq > last, "REPLY {} after REPLY {last}", f.seq);
                    }
                    let count = u64::from_be_bytes(f.body[..8].try_into().unwrap());
                    self.answers.push((f.seq, count));
                }
                Kind::Push => {
                    if let Some(&last) = self.pushes.last() {
                        assert!(f.seq > last, "PUSH {} after PUSH {last}", f.seq);
                    }
                    self.pushes.push(f.seq);
                }
                Kind::Pong => {
                    assert!(
                        self.pinged.remove(&f.seq),
                        "PONG {} for no PING of mine",
                        f.seq
                    );
                }
                Kind::Checkpoint => {}
                other => panic!("the device got {other:?}"),
            }
        }
    }
}

#[derive(Debug, Clone)]
pub enum Op {
    /// The device sends DATA of this many bytes (when the proxy reads it).
    Data(usize),
    Ping,
    /// The device's bytes reach the proxy in two parts, split here.
    Split(usize),
    /// The gateway gets what the proxy wrote; up to n of its frames reach the proxy.
    Deliver(usize),
    Push,
    /// The gateway dies: what it had not delivered is lost.
    Crash,
    Goaway,
    /// Marked down by health checks; `answers`: its link still answers the PING.
    Down {
        answers: bool,
    },
    Hang,
    Order(bool),
    /// Time passes.
    Wait(u64),
}

/// One session under test.
pub struct World {
    pub core: Core,
    pub device: Device,
    pub gateway: Option<Gateway>,
    pub now: Instant,
    pub cadence: u64,
    /// Device bytes not yet given to the proxy.
    pub pending: BytesMut,
    /// A clean close of the gateway is due once its outbox is delivered.
    pub closing: bool,
    pub ticket_floor: u64,
    pub max_window: usize,
    /// A move happened while answers had been delivered and no ticket covered them:
    /// the app's state could not move (the gateway's CHECKPOINT was still in flight).
    pub unticketed_move: bool,
}

impl World {
    /// A session whose gateway checkpoints every REPLY, after one DATA answered.
    pub fn answered() -> World {
        let mut world = World::new(1);
        world.apply(Op::Data(10));
        world.apply(Op::Deliver(5));
        world
    }

    pub fn new(cadence: u64) -> World {
        let hello = Hello {
            device: "d".into(),
            app: "counter".into(),
            resume: None,
        };
        let bytes = Frame::control(Kind::Hello, 0, &hello).encode();
        let (gateway, welcome) = Gateway::open(&bytes, cadence);
        let welcome = Frame::control(Kind::Welcome, 0, &welcome);
        let settings = Settings {
            replay_window: WINDOW,
            forward_checkpoints: false,
        };
        let core = Core::new(
            settings,
            hello,
            &welcome,
            (BytesMut::new(), BytesMut::new()),
        );
        World {
            core,
            device: Device::default(),
            gateway: Some(gateway),
            now: Instant::now(),
            cadence,
            pending: BytesMut::new(),
            closing: false,
            ticket_floor: 0,
            max_window: 0,
            unticketed_move: false,
        }
    }

    /// Hands the core's output on, then does what its step says.
    pub fn settle(&mut self, mut step: Step) {
        loop {
            if step == Step::Go {
                step = self.core.advance();
            }
            match std::mem::replace(&mut step, Step::Go) {
                Step::Go => break,
                Step::End(end) => panic!("the session ended: {end:?}"),
                Step::Move(cause) => self.relink(cause),
            }
        }
        let io = self.core.io();
        // Written whole, as the loop's writes leave a buffer (advanced to empty: its
        // allocation kept until the next step frees it).
        let to_device = io.to_device.clone();
        let to_gateway = io.to_gateway.clone();
        bytes::Buf::advance(io.to_device, to_device.len());
        bytes::Buf::advance(io.to_gateway, to_gateway.len());
        self.device.take(&to_device);
        if let Some(g) = &mut self.gateway
            && self.core.writing_gateway()
        {
            g.take(&to_gateway);
        }
        self.check();
    }

    pub fn relink(&mut self, cause: Cause) {
        self.gateway = None;
        self.closing = false;
        self.unticketed_move |= self.core.ticket.is_none() && self.core.delivered > 0;
        let hello = self.core.begin_move(cause, self.now);
        let (gateway, welcome) = Gateway::open(&hello, self.cadence);
        self.gateway = Some(gateway);
        self.core.relinked(&welcome, BytesMut::new(), self.now);
    }

    pub fn check(&mut self) {
        let c = &self.core;
        if c.ticket.is_some() {
            assert!(
                c.covered >= self.ticket_floor,
                "ticket went back from {} to {}",
                self.ticket_floor,
                c.covered
            );
            self.ticket_floor = c.covered;
        }
        // Bounded: the window stops the device's reads at the limit; one read may bring
        // at most what the device had pending.
        self.max_window = self.max_window.max(c.window_bytes);
        assert!(
            c.window_bytes <= WINDOW + 4096,
            "window {} over the limit",
            c.window_bytes
        );
        assert_eq!(
            c.window_bytes,
            c.window.iter().map(frame_size).sum::<usize>()
        );
    }

    pub fn device_send(&mut self, frame: Frame) {
        self.pending.extend_from_slice(&frame.encode());
        self.feed_device(usize::MAX);
    }

    pub fn feed_device(&mut self, at_most: usize) {
        if !self.core.reading_device() || self.pending.is_empty() {
            return;
        }
        let n = at_most.min(self.pending.len());
        let part = self.pending.split_to(n);
        self.core.io().from_device.extend_from_slice(&part);
        self.settle(Step::Go);
    }

    pub fn deliver(&mut self, n: usize) {
        for _ in 0..n {
            let Some(g) = &mut self.gateway else { return };
            let Some(f) = g.outbox.pop_front() else { break };
            self.core.io().from_gateway.extend_from_slice(&f.encode());
            self.settle(Step::Go);
        }
        let emptied = self.gateway.as_ref().is_some_and(|g| g.outbox.is_empty());
        if self.closing && emptied {
            self.closing = false;
            let step = self.core.gateway_closed(true);
            self.settle(step);
        }
    }

    pub fn apply(&mut self, op: Op) {
        match op {
            Op::Data(len) => {
                if self.core.reading_device() {
                    self.device.sent += 1;
                    let f = Frame::new(Kind::Data, self.device.sent, vec![7u8; len]);
                    self.device_send(f);
                }
            }
            Op::Ping => {
                self.device.next_ping += 1;
                let seq = 1_000_000 + self.device.next_ping;
                self.device.pinged.insert(seq);
                self.device_send(Frame::new(Kind::Ping, seq, []));
            }
            Op::Split(at) => self.feed_device(at),
            Op::Deliver(n) => {
                self.feed_device(usize::MAX);
                self.deliver(n);
            }
            Op::Push => {
                if let Some(g) = &mut self.gateway
                    && !g.hung
                {
                    g.pushes += 1;
                    g.outbox.push_back(Frame::new(Kind::Push, g.pushes, [1]));
                }
            }
            Op::Crash => {
                if self.gateway.take().is_some() {
                    let step = self.core.gateway_closed(false);
                    self.settle(step);
                }
            }
            Op::Goaway => {
                if let Some(g) = &mut self.gateway
                    && !g.going
                    && !g.hung
                {
                    g.going = true;
                    g.outbox.push_back(Frame::new(Kind::Goaway, 0, []));
                    self.closing = true;
                }
            }
            Op::Down { answers } => {
                if self.gateway.is_some() && self.core.watching_down() {
                    self.core.gateway_down(self.now);
                    if let Some(g) = &mut self.gateway {
                        g.hung |= !answers;
                    }
                    self.settle(Step::Go);
                }
            }
            Op::Hang => {
                if let Some(g) = &mut self.gateway {
                    g.hung = true;
                }
            }
            Op::Order(drain) => {
                let cause = if drain {
                    Cause::Drain
                } else {
                    Cause::Rebalance
                };
                if self
                    .core
                    .takes_order(cause, self.now, Duration::from_secs(1))
                {
                    self.core
                        .order(cause, self.now + Duration::from_millis(200));
                }
            }
            Op::Wait(ms) => {
                self.now += Duration::from_millis(ms);
                if self.core.deadline().is_some_and(|d| d <= self.now) {
                    let step = self.core.tick(self.now, false);
                    self.settle(step);
                }
            }
        }
    }

    /// The device stops sending; a gateway that stays answers everything.
    pub fn finish(&mut self) {
        for _ in 0..10_000 {
            let hung = self.gateway.as_ref().is_none_or(|g| g.hung);
            if hung {
                // A hung gateway's link check fails: the session moves.
                self.relink(Cause::Failover);
            }
            self.feed_device(usize::MAX);
            self.deliver(usize::MAX);
            self.settle(Step::Go);
            let idle = self.pending.is_empty()
                && self.gateway.as_ref().is_some_and(|g| g.outbox.is_empty())
                && !self.closing;
            if idle && self.device.answers.len() as u64 == self.device.sent {
                return;
            }
            if idle && self.gateway.as_ref().is_some_and(|g| g.going) {
                // The close after GOAWAY was delivered: it moved; go on with the next.
                continue;
            }
        }
        panic!("the session did not settle");
    }

    /// After [`World::finish`]: every DATA was answered exactly once, in order; and when every
    /// gateway checkpoints (they share the key ring) and every move had a ticket to carry, the
    /// app's state moved with the session: REPLY n carries the n-th count.
    pub fn verdict(&self) {
        let seqs: Vec<u64> = self.device.answers.iter().map(|a| a.0).collect();
        let want: Vec<u64> = (1..=self.device.sent).collect();
        assert_eq!(seqs, want, "answers not exactly once, in order");
        if self.cadence >= 1 && !self.unticketed_move {
            for (seq, count) in &self.device.answers {
                assert_eq!(seq, count, "app state restarted");
            }
        }
    }
}
