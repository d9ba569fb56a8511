//! The session on virtual time against a model gateway: the guarantees under any interleaving
//! (property tests), and each bad input's defined outcome.

extern crate std;

use std::vec;
use std::vec::Vec;

use proptest::prelude::*;
use wasmbed_protocol::{ErrorBody, ErrorCode, Frame, Goaway, Hello, Kind, Resumed, Welcome};

use crate::{Action, Cause, Config, Event, Resume, SendError, Session, Status, Violation};

const MAX: usize = 1 << 16;

/// A gateway for one connection: runs a counter app (its REPLY is the count of DATA the state
/// has seen), seals `(seq, count)` as its ticket, answers in order.
struct Gw {
    rx: Vec<u8>,
    out: Vec<u8>,
    /// The last DATA the state covers, and the count.
    last: u64,
    count: u64,
    checkpoint_every: u64,
    replies: u64,
    refuse_tickets: bool,
    /// GOAWAY sent: close once `out` is read.
    closing: bool,
    welcomed: bool,
}

fn ticket(seq: u64, count: u64) -> Vec<u8> {
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
    fn new(checkpoint_every: u64, refuse_tickets: bool) -> Gw {
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

    fn send(&mut self, f: Frame) {
        f.encode_into(&mut self.out);
    }

    fn input(&mut self, bytes: &[u8]) {
        if self.closing {
            return;
        }
        self.rx.extend_from_slice(bytes);
        while let Ok(Some((f, used))) = wasmbed_protocol::decode(&self.rx, MAX) {
            self.rx.drain(..used);
            self.handle(f);
        }
    }

    fn handle(&mut self, f: Frame) {
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

    fn goaway(&mut self) {
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
        self.closing = true;
    }
}

/// What the application saw, checked as it comes.
#[derive(Default, Debug)]
struct App {
    /// The last DATA with an answer event.
    answered: u64,
    replies: u64,
    lost: u64,
    covered: u64,
    /// A session started without the state (after the first).
    fresh_after_first: bool,
    welcomes: u64,
    disconnects: Vec<Cause>,
    checkpoints: u64,
}

impl App {
    fn see(&mut self, e: Event<'_>) {
        let answer = |app: &mut App, seq: u64| {
            assert_eq!(seq, app.answered + 1, "answers in order, once: {e:?}");
            app.answered = seq;
        };
        match e {
            Event::Reply { seq, body } => {
                answer(self, seq);
                self.replies += 1;
                let count = u64::from_le_bytes(body.try_into().expect("an 8-byte count"));
                if !self.fresh_after_first {
                    assert_eq!(count, seq, "the state has every DATA exactly once");
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
struct World {
    s: Session<Vec<u8>>,
    gw: Option<Gw>,
    app: App,
    now: u64,
    sent: u64,
    checkpoint_every: u64,
    refuse_tickets: bool,
}

impl World {
    fn new(config: &Config<'_>, checkpoint_every: u64) -> World {
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

    fn events(&mut self) {
        while let Some(e) = self.s.poll_event() {
            self.app.see(e);
        }
    }

    /// Connects or closes as the session asks.
    fn service(&mut self) {
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

    fn send(&mut self) {
        match self.s.send_data(b"x") {
            Ok(seq) => {
                assert_eq!(seq, self.sent + 1);
                self.sent = seq;
            }
            Err(SendError::WindowFull) => {}
            Err(e) => panic!("{e:?}"),
        }
    }

    fn deliver_up(&mut self, max: usize) {
        let Some(gw) = self.gw.as_mut() else { return };
        let out = self.s.poll_send();
        let n = out.len().min(max);
        gw.input(&out[..n]);
        self.s.sent(n);
    }

    fn deliver_down(&mut self, max: usize) {
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

    fn drop_connection(&mut self) {
        if self.gw.take().is_some() {
            self.s.closed(self.now);
            self.events();
        }
    }

    fn tick(&mut self, ms: u64) {
        self.now += ms;
        self.s.handle_timeout(self.now);
        self.events();
    }

    /// Runs until every DATA has its answer event (bounded).
    fn settle(&mut self) {
        for _ in 0..10_000 {
            if self.s.owed() == 0 {
                return;
            }
            self.service();
            if self.s.status() == Status::Wait {
                let t = self.s.poll_timeout().expect("a wait ends");
                self.tick(t.saturating_sub(self.now));
            }
            self.deliver_up(usize::MAX);
            self.deliver_down(usize::MAX);
        }
        panic!("not settled: {} owed, {:?}", self.s.owed(), self.app);
    }
}

fn config() -> Config<'static> {
    let mut c = Config::new("device-0001", "counter");
    c.window = 1024;
    c.max_frame = 512;
    c.max_ticket = 64;
    c.seed = 7;
    c
}

#[derive(Debug, Clone)]
enum Op {
    Send,
    ToGateway(usize),
    ToDevice(usize),
    Drop,
    Goaway,
    Tick(u64),
    RefuseTickets(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Send),
        4 => (1usize..64).prop_map(Op::ToGateway),
        4 => (1usize..64).prop_map(Op::ToDevice),
        1 => Just(Op::Drop),
        1 => Just(Op::Goaway),
        1 => (0u64..3000).prop_map(Op::Tick),
        1 => any::<bool>().prop_map(Op::RefuseTickets),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any interleaving of sends, partial reads and writes, drops, GOAWAYs, timeouts and
    /// refused tickets: every DATA gets exactly one answer event, in order; with every
    /// ticket taken, the app's state holds every DATA exactly once; nothing is lost.
    #[test]
    fn every_data_is_answered_once_in_order(ops in proptest::collection::vec(op(), 0..200), every in 1u64..4) {
        let mut w = World::new(&config(), every);
        for op in ops {
            w.service();
            match op {
                Op::Send => w.send(),
                Op::ToGateway(n) => w.deliver_up(n),
                Op::ToDevice(n) => w.deliver_down(n),
                Op::Drop => w.drop_connection(),
                Op::Goaway => if let Some(gw) = w.gw.as_mut().filter(|g| g.welcomed) { gw.goaway() },
                Op::Tick(ms) => w.tick(ms),
                Op::RefuseTickets(r) => w.refuse_tickets = r,
            }
        }
        w.refuse_tickets = false;
        w.settle();
        prop_assert_eq!(w.app.answered, w.sent);
        prop_assert_eq!(w.app.lost, 0);
        prop_assert_eq!(w.s.stats().duplicates, 0);
    }

    /// Whatever a peer sends, the session never panics, keeps to its memory, and ends the
    /// connection with a defined cause when the bytes break the protocol.
    #[test]
    fn arbitrary_bytes_from_the_peer(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..20)) {
        let mut w = World::new(&config(), 1);
        w.service();
        w.deliver_up(usize::MAX);
        for c in chunks {
            let mut rest = &c[..];
            while !rest.is_empty() && w.s.status() == Status::Connected {
                let took = w.s.feed(rest, 0);
                rest = &rest[took..];
                w.events();
            }
            w.send();
            let _ = w.s.poll_send().len();
        }
        prop_assert!(matches!(w.s.status(), Status::Connected | Status::Close));
    }
}

/// A connected world whose session is open (WELCOME read).
fn open_world(every: u64) -> World {
    let mut w = World::new(&config(), every);
    w.service();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    assert_eq!(w.app.welcomes, 1);
    w
}

/// Feeds frames as if from the gateway.
fn feed(w: &mut World, frames: &[Frame]) {
    for f in frames {
        let bytes = f.encode();
        let mut rest = &bytes[..];
        while !rest.is_empty() && w.s.status() == Status::Connected {
            let took = w.s.feed(rest, w.now);
            rest = &rest[took..];
            w.events();
        }
    }
}

fn violation(w: &mut World) -> Option<Violation> {
    w.service();
    match w.app.disconnects.last() {
        Some(Cause::Violation(v)) => Some(*v),
        _ => None,
    }
}

#[test]
fn a_resume_resends_only_what_the_ticket_does_not_cover() {
    let mut w = open_world(2);
    for _ in 0..5 {
        w.send();
    }
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    // Checkpoints after 2 and 4: DATA 5 is answered, not covered.
    assert_eq!(w.s.ticket().map(|t| t.0), Some(4));
    w.drop_connection();
    w.settle();
    w.service();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    assert_eq!(w.app.welcomes, 2);
    assert_eq!(w.s.stats().resent, 1, "DATA 5 again, for its effect");
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    assert_eq!(w.s.stats().replays, 1, "its second answer dropped");
    assert_eq!(w.app.replies, 5);
}

#[test]
fn garbage_and_oversized_frames_end_the_connection_with_their_code() {
    let mut w = open_world(1);
    feed(&mut w, &[Frame::new(Kind::Reply, 1, vec![0; 600])]);
    assert_eq!(
        violation(&mut w),
        Some(Violation::Frame(ErrorCode::FrameTooLarge))
    );
    let mut w = open_world(1);
    let _ = w.s.feed(&[0, 0, 0, 20, 99], 0);
    w.events();
    assert_eq!(
        violation(&mut w),
        Some(Violation::Frame(ErrorCode::UnknownType))
    );
    let mut w = open_world(1);
    feed(
        &mut w,
        &[Frame::new(Kind::Checkpoint, 0, b"not cbor".to_vec())],
    );
    assert_eq!(violation(&mut w), Some(Violation::Body));
    let mut w = open_world(1);
    feed(&mut w, &[Frame::new(Kind::Data, 1, vec![])]);
    assert_eq!(
        violation(&mut w),
        Some(Violation::Unexpected(Kind::Data as u8))
    );
}

#[test]
fn a_resume_that_does_not_fit_what_was_sent_is_refused() {
    let mut w = open_world(1);
    w.send();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    w.drop_connection();
    w.service();
    w.deliver_up(usize::MAX);
    // The gateway claims DATA 9 (never sent) is covered.
    w.gw = None;
    let welcome = Welcome {
        session: "s".into(),
        gateway: "g".into(),
        resumed: Some(Resumed {
            seq: 9,
            state: "restored".into(),
        }),
        resume_refused: None,
    };
    feed(&mut w, &[Frame::control(Kind::Welcome, 0, &welcome)]);
    assert_eq!(violation(&mut w), Some(Violation::Resume));
    assert!(w.s.ticket().is_none(), "the next session starts fresh");
}

#[test]
fn answers_for_data_never_sent_and_stale_checkpoints_are_dropped() {
    let mut w = open_world(1);
    w.send();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    assert_eq!(w.s.ticket().map(|t| t.0), Some(1));
    let stale = wasmbed_protocol::Checkpoint {
        ticket: serde_bytes::ByteBuf::from(ticket(0, 0)),
    };
    feed(
        &mut w,
        &[
            Frame::new(Kind::Reply, 7, vec![]),
            Frame::control(Kind::Checkpoint, 0, &stale),
            Frame::control(Kind::Checkpoint, 5, &stale),
        ],
    );
    let st = w.s.stats();
    assert_eq!((st.ignored, st.stale_checkpoints), (2, 1));
    assert_eq!(w.s.ticket().map(|t| t.0), Some(1));
    assert_eq!(w.s.status(), Status::Connected);
}

#[test]
fn a_skipped_answer_is_reported_lost_in_order() {
    let mut w = open_world(100);
    w.send();
    w.send();
    w.deliver_up(usize::MAX);
    if let Some(g) = w.gw.as_mut() {
        g.out.clear();
    }
    feed(&mut w, &[Frame::new(Kind::Reply, 2, 2u64.to_le_bytes())]);
    assert_eq!((w.app.answered, w.app.lost, w.app.replies), (2, 1, 1));
}

#[test]
fn goaway_mid_frame_finishes_the_frame_then_sends_nothing_new() {
    let mut w = open_world(1);
    w.send();
    w.send();
    // Half of DATA 1 written.
    let first = w.s.poll_send().len();
    w.s.sent(5);
    feed(
        &mut w,
        &[Frame::control(
            Kind::Goaway,
            0,
            &Goaway { reason: "d".into() },
        )],
    );
    assert_eq!(
        w.s.poll_send().len(),
        first / 2 - 5,
        "the rest of DATA 1 only"
    );
    w.s.sent(first / 2 - 5);
    assert!(w.s.poll_send().is_empty());
    w.drop_connection();
    assert_eq!(w.app.disconnects.last(), Some(&Cause::Goaway));
    assert_eq!(w.s.status(), Status::Connect, "a GOAWAY reconnects at once");
    w.settle();
    assert_eq!(w.app.answered, 2);
}

#[test]
fn a_silent_peer_is_left_and_backoff_grows_with_jitter() {
    let mut w = World::new(&config(), 1);
    w.service();
    w.deliver_up(usize::MAX);
    if let Some(g) = w.gw.as_mut() {
        g.out.clear();
    }
    w.tick(config().answer_timeout_ms);
    w.service();
    assert_eq!(w.app.disconnects, vec![Cause::Silent]);
    let mut waits = vec![];
    for _ in 0..12 {
        let until = w.s.poll_timeout().expect("backing off");
        waits.push(until - w.now);
        w.tick(until - w.now);
        assert_eq!(w.s.status(), Status::Connect);
        w.s.closed(w.now);
    }
    let c = config();
    for (i, wait) in waits.iter().enumerate() {
        let base = (c.first_backoff_ms << i).min(c.max_backoff_ms);
        assert!(
            *wait >= base && *wait <= base + base / 2,
            "{i}: {wait} vs {base}"
        );
    }
    assert!(
        waits.windows(2).any(|p| p[1] != 2 * p[0]),
        "jittered: {waits:?}"
    );
}

#[test]
fn keepalive_pings_and_a_dead_peer_is_left() {
    let mut w = open_world(1);
    let ka = config().keepalive_ms;
    w.tick(ka);
    assert_eq!(w.s.poll_send().len(), 13, "a PING");
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    w.tick(ka - 1);
    assert_eq!(w.s.status(), Status::Connected, "the PONG kept it");
    if let Some(g) = w.gw.as_mut() {
        g.closing = true;
    }
    w.tick(1);
    w.deliver_up(usize::MAX);
    w.tick(ka);
    w.service();
    assert_eq!(w.app.disconnects, vec![Cause::Silent]);
}

#[test]
fn each_session_error_has_its_action() {
    for (code, action, status) in [
        (ErrorCode::UnknownApp, Action::GiveUp, Status::Done),
        (ErrorCode::Revoked, Action::GiveUp, Status::Done),
        (ErrorCode::TooManyTraps, Action::Fresh, Status::Wait),
        (ErrorCode::Unavailable, Action::Retry, Status::Wait),
    ] {
        let mut w = open_world(1);
        w.send();
        w.deliver_up(usize::MAX);
        w.deliver_down(usize::MAX);
        w.send();
        feed(&mut w, &[code.frame(0, "no")]);
        w.service();
        assert_eq!(
            w.app.disconnects,
            vec![Cause::Refused {
                code: code as u16,
                action
            }]
        );
        assert_eq!(w.s.status(), status, "{code:?}");
        assert_eq!(w.s.ticket().is_some(), action != Action::Fresh, "{code:?}");
        if action == Action::GiveUp {
            assert_eq!(w.app.lost, 1, "DATA 2 reported lost");
            assert_eq!(w.s.send_data(b"x"), Err(SendError::Done));
        }
    }
    let body = ErrorBody {
        code: 999,
        text: "new".into(),
    };
    assert_eq!(Action::of(body.code), Action::Retry);
}

#[test]
fn a_full_window_pushes_back_and_memory_is_what_the_config_says() {
    let mut c = config();
    c.window = 3 * 14;
    let mut w = World::new(&c, 1000);
    w.service();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    for _ in 0..3 {
        w.send();
    }
    assert_eq!(w.s.send_data(b"x"), Err(SendError::WindowFull));
    assert_eq!(w.s.send_data(&[0; 64]), Err(SendError::TooLarge));
    // Answered and written, no ticket: the oldest answered DATA makes room.
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    assert_eq!(w.s.send_data(b"x"), Ok(4));
    assert_eq!(w.s.stats().evictions, 1);
    let need = Session::<Vec<u8>>::memory(&c);
    assert_eq!(
        Session::new(&c, vec![0u8; need - 1]).err(),
        Some(crate::SetupError::Memory {
            needed: need,
            given: need - 1
        })
    );
}

#[test]
fn a_ticket_kept_across_a_reboot_resumes() {
    let mut w = open_world(1);
    w.send();
    w.send();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    let (seq, t) =
        w.s.ticket()
            .map(|(s, t)| (s, t.to_vec()))
            .expect("a ticket");
    // Reboot: a new session from the stored ticket.
    let mut r = World::new(&config(), 1);
    assert!(r.s.restore(seq, &t));
    assert_eq!(r.s.next_seq(), 3);
    r.sent = 2;
    r.app.answered = 2;
    r.send();
    r.settle();
    assert_eq!(r.app.replies, 1);
    // The gateway's count went on from the ticket's: the state came back.
    assert!(!r.app.fresh_after_first);
}
