//! One anchored session between two hostile peers, for fuzzing: any bytes from the device and
//! from the gateway (whole frames of any kind and sequence, or any bytes at all, cut
//! anywhere), in any order, with the driver's events between them (moves to a gateway whose
//! WELCOME says anything, or that lands later while the device goes on, link checks, orders,
//! time, the device's end). Where [`super::model`]
//! checks that an honest pair gets every answer exactly once, this checks what the core
//! promises whatever its peers send ([`Peers::check`], after every step):
//!
//! - **the device is told nothing invented**: a WELCOME once, first; answers (REPLY, ERROR)
//!   to DATA it sent only, in increasing order, never twice; PUSHes in increasing order; a PONG
//!   only for a PING it sent, at most once each; a CHECKPOINT only when they are forwarded,
//!   and never ahead of the answers; a GOAWAY only once the proxy stops, once; no frame of a
//!   kind only a device sends; a refusal is one ERROR, the last word;
//! - **a gateway gets only what the device sent**: DATA the device sent, in increasing order
//!   on each link; PINGs and PONGs; nothing else (HELLO goes only at a move, whole, with the
//!   device's identity and a ticket a gateway gave, or none);
//! - **memory stays bounded**: the device read only while the replay window has room (so
//!   the window is past its limit by at most a read and a frame begun before it), the read
//!   buffers under one frame once handled, at most 8 of the device's PINGs owed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio_util::codec::Decoder;
use wasmbed_protocol::codec::FrameCodec;
use wasmbed_protocol::{Frame, Hello, Kind, Resumed, Welcome};

use super::*;

/// The replay window of the session under test: small, so that the window's limit and a
/// ticket's overflow are reached by a few frames.
pub const WINDOW: usize = 600;
/// The most bytes one read brings from a peer (the driver's reads are bounded by their
/// buffer; here by this).
pub const READ: usize = 4096;
/// A frame at the protocol's maximum, prefix and header included.
const FRAME_MAX: usize = wasmbed_protocol::PREFIX + wasmbed_protocol::HEADER + DEFAULT_MAX_FRAME;

/// What the driver or a peer does next.
#[derive(Debug, Clone)]
pub enum Event {
    /// Bytes from the device, read if the core reads the device.
    Device(Vec<u8>),
    /// Bytes from the gateway, read if the core reads the gateway.
    Gateway(Vec<u8>),
    /// The gateway's side ended (`true`: in order).
    GatewayClosed(bool),
    /// Health checks marked the gateway down.
    Down,
    /// Time passes, in milliseconds; the core is ticked when due (`true`: the gateway is
    /// healthy again).
    Wait(u64, bool),
    /// A drain (`true`) or rebalance move ordered, for its slot this many ms away.
    Order(bool, u64),
    /// An undrain withdraws the order.
    Withdraw,
    /// The device closed its side.
    DeviceDone,
    /// The proxy stops: GOAWAY to the device.
    HandBack,
    /// A move under way lands now.
    Land,
}

/// How a move ends: the WELCOME of the gateway that takes the session (`resumed` at this
/// sequence, or fresh) and the bytes it sent after it, or no gateway in time; or not yet (the
/// session waits in its move while events go on, until [`Event::Land`]).
#[derive(Debug, Clone)]
pub enum Landing {
    Welcome(Option<u64>, Vec<u8>),
    Failed,
    Later,
}

/// The session and what its two peers have been told so far.
pub struct Peers {
    core: Core,
    now: Instant,
    ended: bool,
    /// What the device sent, decoded as the core decodes it: its PINGs by sequence.
    device_out: FrameCodec,
    device_bytes: BytesMut,
    pings: HashMap<u64, u64>,
    /// What the device got.
    device_in: FrameCodec,
    device_inbox: BytesMut,
    welcomed: bool,
    answered: u64,
    pushed: u64,
    /// The proxy's GOAWAY: due (it stops), and sent.
    handed_back: bool,
    goaway_sent: bool,
    /// What the link to the current gateway carried: its codec, and its last DATA.
    gateway_in: FrameCodec,
    gateway_inbox: BytesMut,
    linked_data: u64,
    /// What the current gateway sent, decoded as the core decodes it: the tickets of its
    /// CHECKPOINTs join every ticket a gateway gave (a move's HELLO carries one of them).
    gateway_out: FrameCodec,
    gateway_bytes: BytesMut,
    tickets: Vec<Vec<u8>>,
    /// A move under way, waiting for its landing.
    moving: bool,
}

impl Peers {
    /// A session the first gateway WELCOMEd (resumed at `resumed`, or fresh), with its
    /// CHECKPOINTs forwarded to the device or not.
    pub fn new(resumed: Option<u64>, forward_checkpoints: bool) -> Peers {
        let hello = Hello {
            device: "d".into(),
            app: "counter".into(),
            resume: resumed.map(|_| serde_bytes::ByteBuf::from(b"t0".to_vec())),
        };
        let welcome = Welcome {
            session: "s".into(),
            gateway: "g".into(),
            resumed: resumed.map(|seq| Resumed {
                seq,
                state: "restored".into(),
            }),
            resume_refused: None,
        };
        let settings = Settings {
            replay_window: WINDOW,
            forward_checkpoints,
        };
        let welcome = Frame::control(Kind::Welcome, 0, &welcome);
        let core = Core::new(
            settings,
            hello,
            &welcome,
            (BytesMut::new(), BytesMut::new()),
        );
        let mut peers = Peers {
            // Answers already given up to a resumed sequence are the device's own.
            answered: core.delivered,
            core,
            now: Instant::now(),
            ended: false,
            device_out: FrameCodec::new(DEFAULT_MAX_FRAME),
            device_bytes: BytesMut::new(),
            pings: HashMap::new(),
            device_in: FrameCodec::new(DEFAULT_MAX_FRAME),
            device_inbox: BytesMut::new(),
            welcomed: false,
            pushed: 0,
            handed_back: false,
            goaway_sent: false,
            gateway_in: FrameCodec::new(DEFAULT_MAX_FRAME),
            gateway_inbox: BytesMut::new(),
            linked_data: 0,
            gateway_out: FrameCodec::new(DEFAULT_MAX_FRAME),
            gateway_bytes: BytesMut::new(),
            // The first gateway resumed the device's own ticket.
            tickets: vec![b"t0".to_vec()],
            moving: false,
        };
        peers.linked_data = peers.core.forwarded;
        peers.drain();
        peers
    }

    /// Whether the session has ended (every later event is ignored).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Applies `event`; a move it causes lands as `land` says.
    pub fn apply(&mut self, event: Event, land: &mut dyn FnMut() -> Landing) {
        if self.ended {
            return;
        }
        let step = match event {
            Event::Device(bytes) => {
                if !self.core.reading_device() {
                    return;
                }
                let bytes = &bytes[..bytes.len().min(READ)];
                self.device_sent(bytes);
                self.core.io().from_device.extend_from_slice(bytes);
                Step::Go
            }
            Event::Gateway(bytes) => {
                if !self.core.reading_gateway() {
                    return;
                }
                let bytes = &bytes[..bytes.len().min(READ)];
                self.gateway_sent(bytes);
                self.core.io().from_gateway.extend_from_slice(bytes);
                Step::Go
            }
            Event::GatewayClosed(clean) => {
                if !self.core.linked() {
                    return;
                }
                self.core.gateway_closed(clean)
            }
            Event::Down => {
                if !self.core.watching_down() {
                    return;
                }
                self.core.gateway_down(self.now);
                Step::Go
            }
            Event::Wait(ms, healthy) => {
                self.now += Duration::from_millis(ms);
                match self.core.deadline() {
                    Some(due) if due <= self.now => self.core.tick(self.now, healthy),
                    _ => Step::Go,
                }
            }
            Event::Order(drain, ms) => {
                let cause = if drain {
                    Cause::Drain
                } else {
                    Cause::Rebalance
                };
                if self
                    .core
                    .takes_order(cause, self.now, Duration::from_secs(1))
                {
                    self.core.order(cause, self.now + Duration::from_millis(ms));
                }
                Step::Go
            }
            Event::Withdraw => {
                self.core.withdraw_order();
                Step::Go
            }
            Event::DeviceDone => {
                self.core.device_finished();
                Step::Go
            }
            Event::HandBack => {
                self.handed_back = true;
                self.core.hand_back();
                Step::Go
            }
            Event::Land => {
                if !self.moving {
                    return;
                }
                match self.land(land) {
                    Some(end) => Step::End(end),
                    None => Step::Go,
                }
            }
        };
        self.settle(step, land);
    }

    /// Lands the move under way as `land` says: on a new gateway, or nowhere (the session's
    /// end), or not yet.
    fn land(&mut self, land: &mut dyn FnMut() -> Landing) -> Option<End> {
        match land() {
            Landing::Welcome(resumed, rest) => {
                let welcome = Welcome {
                    session: "s".into(),
                    gateway: "g".into(),
                    resumed: resumed.map(|seq| Resumed {
                        seq,
                        state: "restored".into(),
                    }),
                    resume_refused: None,
                };
                let rest = &rest[..rest.len().min(READ)];
                self.gateway_in = FrameCodec::new(DEFAULT_MAX_FRAME);
                self.gateway_out = FrameCodec::new(DEFAULT_MAX_FRAME);
                self.gateway_inbox.clear();
                self.gateway_bytes.clear();
                self.linked_data = 0;
                self.gateway_sent(rest);
                self.core.relinked(&welcome, BytesMut::from(rest), self.now);
                self.moving = false;
                None
            }
            Landing::Failed => {
                self.moving = false;
                Some(self.core.relink_failed())
            }
            Landing::Later => None,
        }
    }

    /// Runs the core until it says go on, moving the session when it says so, then hands its
    /// output to the peers and checks.
    fn settle(&mut self, mut step: Step, land: &mut dyn FnMut() -> Landing) {
        // Ends: each landing takes input, and a landing with none is a fresh one with nothing
        // after its WELCOME.
        loop {
            if step == Step::Go {
                step = self.core.advance();
            }
            match std::mem::replace(&mut step, Step::Go) {
                Step::Go => break,
                Step::End(end) => return self.end(end),
                Step::Move(cause) => {
                    // What the old link had in flight is dropped with it.
                    self.drain();
                    let hello = self.core.begin_move(cause, self.now);
                    self.check_hello(&hello);
                    self.moving = true;
                    if let Some(end) = self.land(land) {
                        step = Step::End(end);
                    }
                }
            }
        }
        self.drain();
        self.check();
    }

    /// The session's end: the proxy's last word, an ERROR naming the frame refused (the
    /// device's own, whatever its sequence), or none.
    fn end(&mut self, end: End) {
        self.drain();
        self.ended = true;
        if let End::Refuse(frame) = &end {
            assert_eq!(frame.kind, Kind::Error, "a refusal is an ERROR");
            self.core.push_to_device(frame);
            let io = self.core.io();
            let mut last = io.to_device.split();
            let told = self.device_in.decode(&mut last).ok().flatten();
            assert!(
                told.is_some_and(|f| f.kind == Kind::Error) && last.is_empty(),
                "a refusal's ERROR is one frame"
            );
        }
    }

    /// The current gateway's bytes as the core will read them: the tickets of its CHECKPOINTs.
    fn gateway_sent(&mut self, bytes: &[u8]) {
        self.gateway_bytes.extend_from_slice(bytes);
        while let Ok(Some(f)) = self.gateway_out.decode(&mut self.gateway_bytes) {
            if f.kind == Kind::Checkpoint
                && let Ok(c) = f.decode_body::<wasmbed_protocol::Checkpoint>("CHECKPOINT")
            {
                self.tickets.push(c.ticket.into_vec());
            }
        }
    }

    /// The device's bytes as the core will read them: its PINGs counted (each is owed one
    /// PONG at most).
    fn device_sent(&mut self, bytes: &[u8]) {
        self.device_bytes.extend_from_slice(bytes);
        while let Ok(Some(f)) = self.device_out.decode(&mut self.device_bytes) {
            if f.kind == Kind::Ping {
                *self.pings.entry(f.seq).or_default() += 1;
            }
        }
    }

    /// Takes what the core wrote each way (as the driver's writes do) and checks every frame
    /// against what the peer may be told.
    fn drain(&mut self) {
        // The driver writes to the gateway only while it may (not after its GOAWAY).
        let writing = self.core.writing_gateway();
        let io = self.core.io();
        let to_device = io.to_device.split();
        let to_gateway = writing.then(|| io.to_gateway.split());
        self.device_inbox.extend_from_slice(&to_device);
        while let Some(f) = self.device_in.decode(&mut self.device_inbox).ok().flatten() {
            self.told_device(&f);
        }
        if let Some(to_gateway) = to_gateway {
            self.gateway_inbox.extend_from_slice(&to_gateway);
            while let Some(f) = self
                .gateway_in
                .decode(&mut self.gateway_inbox)
                .ok()
                .flatten()
            {
                self.told_gateway(&f);
            }
        }
        // Whole frames only, each one its peer can read.
        assert!(
            self.device_inbox.is_empty() && self.gateway_inbox.is_empty(),
            "the core wrote a frame its peer cannot read"
        );
    }

    fn told_device(&mut self, f: &Frame) {
        if !self.welcomed {
            assert_eq!(f.kind, Kind::Welcome, "the device's first frame");
            self.welcomed = true;
            return;
        }
        match f.kind {
            Kind::Reply | Kind::Error if f.seq > 0 => {
                assert!(
                    f.seq <= self.core.sent,
                    "an answer to DATA {} the device never sent (last {})",
                    f.seq,
                    self.core.sent
                );
                assert!(
                    f.seq > self.answered,
                    "answer {} after answer {}",
                    f.seq,
                    self.answered
                );
                self.answered = f.seq;
            }
            // The session's end, said by the gateway or the proxy.
            Kind::Error => {}
            Kind::Push => {
                assert!(f.seq > self.pushed, "PUSH {} after {}", f.seq, self.pushed);
                self.pushed = f.seq;
            }
            Kind::Pong => {
                let owed = self.pings.get_mut(&f.seq);
                assert!(
                    owed.as_ref().is_some_and(|n| **n > 0),
                    "a PONG {} for no PING of the device's",
                    f.seq
                );
                if let Some(n) = owed {
                    *n -= 1;
                }
            }
            Kind::Checkpoint => {
                assert!(
                    self.core.settings.forward_checkpoints,
                    "a CHECKPOINT forwarded against the settings"
                );
                assert!(
                    f.seq <= self.answered,
                    "a CHECKPOINT {} ahead of the answers ({})",
                    f.seq,
                    self.answered
                );
            }
            Kind::Goaway => {
                assert!(
                    self.handed_back && !self.goaway_sent,
                    "a GOAWAY the proxy did not give, or twice"
                );
                self.goaway_sent = true;
            }
            Kind::Ping => {}
            other => panic!("the device was sent {other:?}"),
        }
    }

    fn told_gateway(&mut self, f: &Frame) {
        match f.kind {
            Kind::Data => {
                assert!(
                    f.seq <= self.core.sent,
                    "DATA {} the device never sent",
                    f.seq
                );
                assert!(
                    f.seq > self.linked_data,
                    "DATA {} after DATA {} on one link",
                    f.seq,
                    self.linked_data
                );
                self.linked_data = f.seq;
            }
            Kind::Ping | Kind::Pong => {}
            other => panic!("a gateway was sent {other:?}"),
        }
    }

    /// A move's HELLO: the device's, with a ticket a gateway gave (the latest the core
    /// kept), or none.
    fn check_hello(&self, hello: &[u8]) {
        let mut buf = BytesMut::from(hello);
        let frame = FrameCodec::new(DEFAULT_MAX_FRAME).decode(&mut buf);
        let hello = match frame {
            Ok(Some(f)) if f.kind == Kind::Hello && buf.is_empty() => {
                f.decode_body::<Hello>("HELLO")
            }
            other => panic!("a move's HELLO is not one frame: {other:?}"),
        };
        let hello = hello.unwrap_or_else(|e| panic!("a move's HELLO does not decode: {e}"));
        assert_eq!(
            (hello.device.as_str(), hello.app.as_str()),
            ("d", "counter")
        );
        if let Some(t) = hello.resume {
            assert!(
                self.tickets.contains(&t.into_vec()),
                "a move's HELLO carries a ticket no gateway gave"
            );
        }
    }

    /// What holds after every step.
    fn check(&self) {
        let c = &self.core;
        assert_eq!(
            c.window_bytes,
            c.window.iter().map(frame_size).sum::<usize>(),
            "the window's count"
        );
        // The device is read only under the limit (so one read, and a frame begun before it,
        // take the window past it at most).
        assert!(
            !c.reading_device() || c.window_bytes < WINDOW,
            "the device read with the window at {}",
            c.window_bytes
        );
        assert!(
            c.window_bytes < WINDOW + READ + FRAME_MAX,
            "window {} over the limit",
            c.window_bytes
        );
        assert!(
            c.window
                .iter()
                .zip(c.window.iter().skip(1))
                .all(|(a, b)| a.seq < b.seq),
            "the window out of order"
        );
        // Every whole frame handled: what is left of a read is under one frame.
        assert!(c.from_device.len() < FRAME_MAX, "device bytes left unread");
        if c.linked() {
            assert!(
                c.from_gateway.len() < FRAME_MAX,
                "gateway bytes left unread"
            );
        }
        assert!(c.pings.len() <= MAX_PINGS, "PINGs owed past the bound");
        assert!(c.delivered <= c.sent && c.forwarded <= c.sent, "sequences");
    }
}

/// A CHECKPOINT frame carrying `ticket`, encoded (for a peer that makes well-formed ones).
pub fn checkpoint(seq: u64, ticket: &[u8]) -> Vec<u8> {
    let c = wasmbed_protocol::Checkpoint {
        ticket: serde_bytes::ByteBuf::from(ticket.to_vec()),
    };
    Frame::control(Kind::Checkpoint, seq, &c).encode()
}
