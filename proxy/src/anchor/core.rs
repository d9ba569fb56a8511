//! The anchor's core: everything a terminate-mode session keeps so that it can move between
//! gateways, as a plain value with no I/O and no clock of its own (the quinn-proto pattern).
//!
//! Its driver ([`super::serve`]) feeds it events — bytes from the device and from the gateway
//! (read straight into its buffers: [`Core::io`]), the device's end of stream, the link lost or closed, the gateway marked down, a
//! move ordered, a move done, the time — and takes from it the bytes to write each way
//! ([`Core::to_device`], [`Core::to_gateway`]), what to read next ([`Core::reading_device`],
//! [`Core::reading_gateway`]), when to wake ([`Core::deadline`]), and [`Step`]s: go on,
//! move, end. The guarantees live here and are property-tested here (`tests` below): every
//! DATA the device sends is answered exactly once and in order, across any number of moves;
//! no answer is invented; the ticket never goes backwards; the replay window stays bounded.
//!
//! What it keeps: the device's HELLO, the latest CHECKPOINT ticket and the DATA sequence it
//! covers, the DATA above it (the replay window), the last sequences sent, forwarded and
//! answered, PUSH renumbering after a fresh move, the device's PINGs in flight, and the
//! session's [`Phase`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};
use wasmbed_protocol::codec::{CodecError, FrameCodec};
use wasmbed_protocol::{Checkpoint, DEFAULT_MAX_FRAME, ErrorCode, Frame, Hello, Kind, Welcome};

/// Bytes queued for one side past which the other side is not read.
pub const HIGH_WATER: usize = 256 * 1024;
/// PINGs of a device waiting for the gateway's PONG; past it the proxy answers them itself.
const MAX_PINGS: usize = 8;
/// How long a link whose gateway was marked down has to answer the proxy's PING before the
/// session moves; while the gateway stays down, the link is checked again this often.
pub const LINK_CHECK: Duration = Duration::from_secs(1);
/// The sequence of the proxy's own PINGs on a link (not forwarded: the PONG is the proxy's).
const PROBE_SEQ: u64 = u64::MAX;

/// Why a session moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The gateway closed or reset without GOAWAY, sent garbage, or was marked down.
    Failover,
    /// The gateway said GOAWAY.
    Goaway,
    /// `drain?move=true`.
    Drain,
    /// Rebalancing (`--rebalance on`).
    Rebalance,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Failover => "failover",
            Cause::Goaway => "goaway",
            Cause::Drain => "drain",
            Cause::Rebalance => "rebalance",
        }
    }

    /// Whether the move takes its `--move-rate` slot when it starts relinking. Every cause but
    /// failover is paced (a dead gateway's sessions go now); a drained or rebalanced session
    /// took its slot before it let go of its link (which stays up meanwhile), so only a
    /// GOAWAY's move takes one here.
    pub fn slot_at_relink(self) -> bool {
        self == Cause::Goaway
    }
}

/// Where the session is with its gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Linked: frames go both ways. `check` is the link's own check after its gateway was
    /// marked down; `order` a paced move's turn.
    Linked {
        check: Check,
        order: Option<(Instant, Cause)>,
    },
    /// The gateway said GOAWAY: its answers still come, nothing new goes to it; its close
    /// moves the session. A link check under way goes on (a gateway that says GOAWAY and
    /// then hangs is still found out).
    Going { check: Check },
    /// No gateway: a move is under way (the driver is finding one), since `since`.
    Moving { cause: Cause, since: Instant },
}

/// A link's check after its gateway was marked down. Health checks judge a gateway from
/// outside, and on an overloaded host they time out on gateways that still serve: moving
/// every session of each gateway a probe timed out on would feed the overload (a storm of
/// moves, then of more timeouts). So a session first asks its own link: a PING the gateway
/// answers within [`LINK_CHECK`] keeps the session where it is; no answer moves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The gateway is up: the driver watches for it to be marked down.
    Watching,
    /// A PING is out; no PONG by then: move.
    Pinged { until: Instant },
    /// The PONG came and the gateway was still marked down: look again then.
    Answered { again: Instant },
}

/// How a session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Closed in order (the device left, or the gateway ended the session and said why).
    Closed,
    /// The device gets this ERROR, then the close.
    Refuse(Frame),
}

/// What the driver does after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Go,
    /// Drop the link (the gateway is suspect when `Failover`) and move: [`Core::begin_move`].
    Move(Cause),
    End(End),
}

/// Counts for the proxy's metrics, taken by the driver after each turn ([`Core::take_tally`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Answers dropped because the device already had them.
    pub duplicates: u32,
    /// DATA sent again to a new gateway.
    pub replayed: u32,
    /// Tickets given up because the window filled with answered DATA no ticket covered.
    pub overflows: u32,
}

/// The core's buffers, for the driver's reads and writes ([`Core::io`]).
pub struct Io<'a> {
    pub to_device: &'a mut BytesMut,
    pub to_gateway: &'a mut BytesMut,
    pub from_device: &'a mut BytesMut,
    pub from_gateway: &'a mut BytesMut,
}

/// The session's settings (fixed for its life).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `--replay-window`: bytes of DATA kept; past it the device is not read.
    pub replay_window: usize,
    /// `--forward-checkpoints`: CHECKPOINT frames reach the device too.
    pub forward_checkpoints: bool,
}

/// What the proxy keeps of one terminate-mode session.
pub struct Core {
    settings: Settings,
    hello: Hello,
    /// The latest ticket and the DATA it covers.
    ticket: Option<Vec<u8>>,
    covered: u64,
    /// DATA sent by the device above `covered` (or, with no ticket, not answered yet).
    window: VecDeque<Frame>,
    window_bytes: usize,
    /// The last DATA the device sent; handed to the current (or last) gateway; answered.
    sent: u64,
    forwarded: u64,
    delivered: u64,
    /// The last PUSH the device got; a fresh session's pushes are numbered on from it.
    pushed: u64,
    push_offset: u64,
    /// The device's PINGs the gateway has not answered yet.
    pings: Vec<u64>,
    phase: Phase,
    /// When the session last moved.
    moved_at: Option<Instant>,
    to_device: BytesMut,
    to_gateway: BytesMut,
    from_device: BytesMut,
    from_gateway: BytesMut,
    device_codec: FrameCodec,
    gateway_codec: FrameCodec,
    /// The device closed its side: the session ends once its DATA are answered.
    device_done: bool,
    /// The proxy is stopping and told the device (GOAWAY): see [`Core::hand_back`].
    handed_back: bool,
    tally: Tally,
}

/// Appends `frame`'s encoding (the protocol codec's). Every frame here was decoded under the
/// same maximum, or is a small one the proxy made, so the encoder's size check cannot fail.
fn put(dst: &mut BytesMut, frame: &Frame) {
    let _ = FrameCodec::new(DEFAULT_MAX_FRAME).encode(frame, dst);
}

fn frame_size(frame: &Frame) -> usize {
    wasmbed_protocol::PREFIX + wasmbed_protocol::HEADER + frame.body.len()
}

/// Frees a buffer once it is empty: an idle session (most sessions, most of the time) then
/// holds no buffer at all. Whatever its capacity says: a buffer whose bytes were all split
/// off (decoded into frames) or written, up to the end of its allocation, has no capacity
/// left and still holds that allocation (docs/performance.md, "What a message leaves behind").
fn trim(buf: &mut BytesMut) {
    if buf.is_empty() {
        *buf = BytesMut::new();
    }
}

impl Core {
    /// A session the first gateway WELCOMEd: `welcome` goes to the device first; `rest` is
    /// what the gateway sent after it, `pending` what the device sent after its HELLO.
    pub fn new(
        settings: Settings,
        hello: Hello,
        welcome: &Frame,
        (rest, pending): (BytesMut, BytesMut),
    ) -> Core {
        let mut core = Core {
            settings,
            ticket: None,
            covered: 0,
            window: VecDeque::new(),
            window_bytes: 0,
            sent: 0,
            forwarded: 0,
            delivered: 0,
            pushed: 0,
            push_offset: 0,
            pings: Vec::new(),
            phase: Phase::Linked {
                check: Check::Watching,
                order: None,
            },
            moved_at: None,
            to_device: BytesMut::new(),
            to_gateway: BytesMut::new(),
            from_device: pending,
            from_gateway: rest,
            device_codec: FrameCodec::new(DEFAULT_MAX_FRAME),
            gateway_codec: FrameCodec::new(DEFAULT_MAX_FRAME),
            device_done: false,
            handed_back: false,
            tally: Tally::default(),
            hello,
        };
        // A device resuming its own session: the ticket stays good until the first checkpoint.
        // The HELLO keeps no ticket of its own (a move sends the latest, `begin_move`).
        let resume = core.hello.resume.take();
        if let Ok(w) = welcome.decode_body::<Welcome>("WELCOME")
            && let Some(r) = w.resumed
        {
            core.ticket = resume.map(serde_bytes::ByteBuf::into_vec);
            (core.covered, core.sent, core.delivered, core.forwarded) =
                (r.seq, r.seq, r.seq, r.seq);
        }
        put(&mut core.to_device, welcome);
        core
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether a move now would lose app state the session built: it holds a ticket, or
    /// its gateway answered DATA and never sealed a ticket (a gateway with no key ring).
    pub fn has_state_to_move(&self) -> bool {
        self.ticket.is_some() || self.delivered > 0
    }

    /// When the session last moved.
    pub fn moved_at(&self) -> Option<Instant> {
        self.moved_at
    }

    // ---- input -------------------------------------------------------------------------

    /// The device closed its side: the session ends once its DATA are answered.
    pub fn device_finished(&mut self) {
        self.device_done = true;
    }

    /// The proxy is stopping: GOAWAY to the device, once. As from a gateway, it means: send
    /// nothing new, read what you are owed, then reconnect (through another proxy, resuming
    /// with your latest ticket). The answers owed still come; the session ends when the device
    /// closes with every DATA answered. Returns whether it was sent now.
    pub fn hand_back(&mut self) -> bool {
        if self.handed_back {
            return false;
        }
        self.handed_back = true;
        put(&mut self.to_device, &Frame::new(Kind::Goaway, 0, []));
        true
    }

    /// Handles every whole frame buffered from both sides; then, when the device is done and
    /// has every answer, the session ends.
    pub fn advance(&mut self) -> Step {
        if let Err(end) = self.on_device_frames() {
            return Step::End(end);
        }
        if self.linked() {
            let step = self.on_gateway_frames();
            if step != Step::Go {
                return step;
            }
        }
        if self.device_done && self.delivered >= self.sent && self.pings.is_empty() {
            return Step::End(End::Closed);
        }
        if self.going() && !self.pings.is_empty() {
            self.answer_pings();
        }
        for buf in [
            &mut self.from_device,
            &mut self.from_gateway,
            &mut self.to_device,
            &mut self.to_gateway,
        ] {
            trim(buf);
        }
        // The same for the window and the PINGs owed, once emptied (a `Vec`'s capacity does
        // say whether it holds an allocation).
        if self.window.is_empty() && self.window.capacity() > 0 {
            self.window = VecDeque::new();
        }
        if self.pings.is_empty() && self.pings.capacity() > 0 {
            self.pings = Vec::new();
        }
        Step::Go
    }

    /// The gateway's side ended: in order (`clean`: end of stream) or not (reset, error).
    pub fn gateway_closed(&mut self, clean: bool) -> Step {
        if clean && self.device_done && !self.going() {
            return Step::End(End::Closed);
        }
        Step::Move(if clean && self.going() {
            Cause::Goaway
        } else {
            Cause::Failover
        })
    }

    /// The gateway was marked down (health checks). Unless it said GOAWAY (its close will
    /// move the session), the link is asked first: a PING with [`LINK_CHECK`] to answer.
    pub fn gateway_down(&mut self, now: Instant) {
        if let Phase::Linked { check, .. } = &mut self.phase {
            *check = Check::Pinged {
                until: now + LINK_CHECK,
            };
            put(&mut self.to_gateway, &Frame::new(Kind::Ping, PROBE_SEQ, []));
        }
    }

    /// The time is `now` (at or after [`Core::deadline`]); `healthy`: the gateway's state.
    pub fn tick(&mut self, now: Instant, healthy: bool) -> Step {
        let (check, order) = match &mut self.phase {
            Phase::Linked { check, order } => (check, Some(order)),
            Phase::Going { check } => (check, None),
            Phase::Moving { .. } => return Step::Go,
        };
        match *check {
            Check::Pinged { until } if now >= until => return Step::Move(Cause::Failover),
            Check::Answered { again } if now >= again => {
                if healthy {
                    *check = Check::Watching;
                } else {
                    *check = Check::Pinged {
                        until: now + LINK_CHECK,
                    };
                    put(&mut self.to_gateway, &Frame::new(Kind::Ping, PROBE_SEQ, []));
                }
            }
            _ => {}
        }
        if let Some(order) = order
            && let Some((at, cause)) = *order
            && now >= at
        {
            *order = None;
            return Step::Move(cause);
        }
        Step::Go
    }

    /// Whether a move order (drain, rebalance) may be taken now: linked, not already ordered
    /// to move, and for a rebalance, not moved within `cooldown`.
    pub fn takes_order(&self, cause: Cause, now: Instant, cooldown: Duration) -> bool {
        let cooling = cause == Cause::Rebalance
            && self
                .moved_at
                .is_some_and(|t| now.saturating_duration_since(t) < cooldown);
        matches!(self.phase, Phase::Linked { order: None, .. }) && !cooling
    }

    /// Withdraws the move ordered and not begun (an undrain came before its slot); whether
    /// there was one.
    pub fn withdraw_order(&mut self) -> bool {
        match &mut self.phase {
            Phase::Linked { order, .. } => order.take().is_some(),
            _ => false,
        }
    }

    /// A move ordered for `at` (its `--move-rate` slot).
    pub fn order(&mut self, cause: Cause, at: Instant) {
        if let Phase::Linked { order, .. } = &mut self.phase {
            *order = Some((at, cause));
        }
    }

    /// The link is dropped and a move begins at `now`: the device's PINGs are answered by the
    /// proxy, nothing more goes to the old gateway. Returns the HELLO to open the session
    /// elsewhere: the device's, with the latest ticket.
    pub fn begin_move(&mut self, cause: Cause, now: Instant) -> Vec<u8> {
        self.phase = Phase::Moving { cause, since: now };
        self.to_gateway.clear();
        self.from_gateway.clear();
        self.answer_pings();
        let mut hello = self.hello.clone();
        hello.resume = self
            .ticket
            .as_ref()
            .map(|t| serde_bytes::ByteBuf::from(t.clone()));
        Frame::control(Kind::Hello, 0, &hello).encode()
    }

    /// A new gateway took the session at `now` with `welcome`, and sent `rest` after it: the
    /// window is replayed above what its WELCOME covers. Returns `resumed` or `fresh`, and the
    /// pause since the move began.
    pub fn relinked(
        &mut self,
        welcome: &Welcome,
        rest: BytesMut,
        now: Instant,
    ) -> (&'static str, Duration) {
        let since = match self.phase {
            Phase::Moving { since, .. } => since,
            _ => now,
        };
        let (from, result) = match &welcome.resumed {
            Some(r) => (r.seq, "resumed"),
            None => {
                // A new session: the ticket describes nothing there, PUSHes count from 1.
                self.ticket = None;
                self.covered = 0;
                self.push_offset = self.pushed;
                (self.delivered, "fresh")
            }
        };
        let mut replayed = 0;
        for f in self.window.iter().filter(|f| f.seq > from) {
            put(&mut self.to_gateway, f);
            // Sent before to the old gateway: a replay (the rest is new to any gateway).
            replayed += u32::from(f.seq <= self.forwarded);
        }
        self.forwarded = self.sent;
        self.tally.replayed = self.tally.replayed.saturating_add(replayed);
        self.gateway_codec = FrameCodec::new(DEFAULT_MAX_FRAME);
        self.from_gateway = rest;
        self.phase = Phase::Linked {
            check: Check::Watching,
            order: None,
        };
        self.moved_at = Some(now);
        self.prune();
        (result, now.saturating_duration_since(since))
    }

    /// No gateway took the session in time.
    pub fn relink_failed(&mut self) -> End {
        let text = "no gateway took the session in time".to_string();
        End::Refuse(ErrorCode::Unavailable.frame(0, text))
    }

    /// The device's certificate was revoked (a CRL reload).
    pub fn revoked(&mut self) -> End {
        let text = "the device's certificate was revoked".to_string();
        End::Refuse(ErrorCode::Revoked.frame(0, text))
    }

    // ---- output ------------------------------------------------------------------------

    /// The four buffers, borrowed apart for the driver's I/O: it writes from the front of
    /// the `to_` ones and reads into the `from_` ones (handled by the next
    /// [`Core::advance`]), with no copy in between.
    pub fn io(&mut self) -> Io<'_> {
        Io {
            to_device: &mut self.to_device,
            to_gateway: &mut self.to_gateway,
            from_device: &mut self.from_device,
            from_gateway: &mut self.from_gateway,
        }
    }

    /// A last frame for the device (the ERROR of an [`End::Refuse`]).
    pub fn push_to_device(&mut self, frame: &Frame) {
        put(&mut self.to_device, frame);
    }

    /// Whether the device is read: not done, the window has room, neither side is backed up.
    pub fn reading_device(&self) -> bool {
        !self.device_done
            && self.window_bytes < self.settings.replay_window
            && self.to_gateway.len() < HIGH_WATER
            && self.to_device.len() < HIGH_WATER
    }

    /// Whether the gateway is read (there is one and the device is not backed up).
    pub fn reading_gateway(&self) -> bool {
        self.linked() && self.to_device.len() < HIGH_WATER
    }

    /// Whether bytes go to the gateway (linked and it did not say GOAWAY).
    pub fn writing_gateway(&self) -> bool {
        matches!(self.phase, Phase::Linked { .. })
    }

    /// Whether the driver watches the gateway for being marked down.
    pub fn watching_down(&self) -> bool {
        matches!(
            self.phase,
            Phase::Linked {
                check: Check::Watching,
                ..
            }
        )
    }

    /// When [`Core::tick`] is due next.
    pub fn deadline(&self) -> Option<Instant> {
        let (check, order) = match self.phase {
            Phase::Linked { check, order } => (check, order),
            Phase::Going { check } => (check, None),
            Phase::Moving { .. } => return None,
        };
        let check = match check {
            Check::Watching => None,
            Check::Pinged { until } => Some(until),
            Check::Answered { again } => Some(again),
        };
        match (check, order.map(|o| o.0)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The counts since the last call.
    pub fn take_tally(&mut self) -> Tally {
        std::mem::take(&mut self.tally)
    }

    // ---- inside ------------------------------------------------------------------------

    /// When the link's PING is due to be answered, while one is out.
    fn pinged(&self) -> Option<Instant> {
        match self.phase {
            Phase::Linked {
                check: Check::Pinged { until },
                ..
            }
            | Phase::Going {
                check: Check::Pinged { until },
            } => Some(until),
            _ => None,
        }
    }

    fn going(&self) -> bool {
        matches!(self.phase, Phase::Going { .. })
    }

    fn linked(&self) -> bool {
        !matches!(self.phase, Phase::Moving { .. })
    }

    /// Handles the device's buffered frames.
    fn on_device_frames(&mut self) -> Result<(), End> {
        loop {
            let frame = match self.device_codec.decode(&mut self.from_device) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(CodecError::Protocol(e)) => {
                    return Err(End::Refuse(e.code().frame(0, e.to_string())));
                }
                Err(CodecError::Io(_)) => return Err(End::Closed),
            };
            let open = self.writing_gateway();
            match frame.kind {
                Kind::Data => {
                    if frame.seq <= self.sent {
                        let text = format!(
                            "DATA {} after DATA {}: sequences must increase",
                            frame.seq, self.sent
                        );
                        return Err(End::Refuse(ErrorCode::BadFrame.frame(frame.seq, text)));
                    }
                    self.sent = frame.seq;
                    if open {
                        put(&mut self.to_gateway, &frame);
                        self.forwarded = frame.seq;
                    }
                    self.window_bytes += frame_size(&frame);
                    self.window.push_back(frame);
                }
                Kind::Ping if open && self.pings.len() < MAX_PINGS => {
                    self.pings.push(frame.seq);
                    put(&mut self.to_gateway, &frame);
                }
                Kind::Ping => put(&mut self.to_device, &Frame::new(Kind::Pong, frame.seq, [])),
                Kind::Pong if open => put(&mut self.to_gateway, &frame),
                Kind::Pong => {}
                Kind::Hello => {
                    let text = "HELLO sent twice".to_string();
                    return Err(End::Refuse(ErrorCode::BadHello.frame(frame.seq, text)));
                }
                other => {
                    let text = format!("a device may not send {}", other.as_str());
                    return Err(End::Refuse(ErrorCode::BadFrame.frame(frame.seq, text)));
                }
            }
        }
    }

    /// Handles the gateway's buffered frames.
    fn on_gateway_frames(&mut self) -> Step {
        loop {
            let frame = match self.gateway_codec.decode(&mut self.from_gateway) {
                Ok(Some(f)) => f,
                Ok(None) => return Step::Go,
                Err(e) => {
                    tracing::debug!(error = %e, "the gateway sent a bad frame: moving");
                    return Step::Move(Cause::Failover);
                }
            };
            match frame.kind {
                // An answer to DATA the device never sent would make later real answers look
                // like duplicates: that gateway is not believed.
                Kind::Reply | Kind::Error if frame.seq > self.sent => {
                    tracing::debug!(
                        seq = frame.seq,
                        sent = self.sent,
                        "the gateway answered DATA never sent: moving"
                    );
                    return Step::Move(Cause::Failover);
                }
                Kind::Reply | Kind::Error if frame.seq > 0 => {
                    if frame.seq > self.delivered {
                        self.delivered = frame.seq;
                        put(&mut self.to_device, &frame);
                        self.prune();
                    } else {
                        self.tally.duplicates += 1;
                    }
                }
                // The gateway ended the session (too many traps, idle): the device is told.
                Kind::Error => {
                    put(&mut self.to_device, &frame);
                    return Step::End(End::Closed);
                }
                Kind::Push => {
                    let Some(seq) = frame.seq.checked_add(self.push_offset) else {
                        tracing::debug!(seq = frame.seq, "a PUSH sequence past the end: moving");
                        return Step::Move(Cause::Failover);
                    };
                    if seq > self.pushed {
                        self.pushed = seq;
                        put(
                            &mut self.to_device,
                            &Frame::new(Kind::Push, seq, frame.body),
                        );
                    } else {
                        self.tally.duplicates += 1;
                    }
                }
                Kind::Pong if frame.seq == PROBE_SEQ && self.pinged().is_some() => {
                    // The link answered the proxy's own PING: it stays; look again later.
                    if let Some(until) = self.pinged()
                        && let Phase::Linked { check, .. } | Phase::Going { check } =
                            &mut self.phase
                    {
                        *check = Check::Answered { again: until };
                    }
                }
                // The answer to a device's PING still owed; one the proxy gave already (the
                // link was going or gone) is not given twice.
                Kind::Pong => match self.pings.iter().position(|&s| s == frame.seq) {
                    Some(i) => {
                        self.pings.swap_remove(i);
                        put(&mut self.to_device, &frame);
                    }
                    None => self.tally.duplicates += 1,
                },
                Kind::Ping => put(&mut self.to_device, &frame),
                // A ticket claiming DATA not answered yet would prune DATA still owed an answer.
                Kind::Checkpoint if frame.seq > self.delivered => {
                    tracing::debug!(
                        seq = frame.seq,
                        delivered = self.delivered,
                        "CHECKPOINT beyond the answers: moving"
                    );
                    return Step::Move(Cause::Failover);
                }
                Kind::Checkpoint => match frame.decode_body::<Checkpoint>("CHECKPOINT") {
                    Ok(c) => {
                        if self.settings.forward_checkpoints {
                            put(&mut self.to_device, &frame);
                        }
                        // A ticket never goes backwards: an older one than held is ignored.
                        if self.ticket.is_none() || frame.seq >= self.covered {
                            self.ticket = Some(c.ticket.into_vec());
                            self.covered = frame.seq;
                        }
                        self.prune();
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "bad CHECKPOINT from the gateway: moving");
                        return Step::Move(Cause::Failover);
                    }
                },
                Kind::Goaway => {
                    if let Phase::Linked { check, .. } = self.phase {
                        // A paced move ordered before is moot: the close will move it.
                        self.phase = Phase::Going { check };
                    }
                }
                other => {
                    tracing::debug!(
                        kind = other.as_str(),
                        "the gateway sent a frame it may not send: moving"
                    );
                    return Step::Move(Cause::Failover);
                }
            }
        }
    }

    /// Answers the PINGs the gateway will not: the link is going or gone.
    fn answer_pings(&mut self) {
        for seq in std::mem::take(&mut self.pings) {
            put(&mut self.to_device, &Frame::new(Kind::Pong, seq, []));
        }
    }

    /// Drops the DATA a move would not replay: covered by the ticket, or (with no ticket)
    /// answered. A window full of answered DATA that no checkpoint covers would never drain:
    /// the ticket goes (a later move starts the app afresh), counted.
    fn prune(&mut self) {
        let floor = if self.ticket.is_some() {
            self.covered
        } else {
            self.delivered
        };
        while self.window.front().is_some_and(|f| f.seq <= floor) {
            if let Some(f) = self.window.pop_front() {
                self.window_bytes -= frame_size(&f);
            }
        }
        let all_answered = self.window.back().is_none_or(|f| f.seq <= self.delivered);
        if self.ticket.is_some() && self.window_bytes >= self.settings.replay_window && all_answered
        {
            tracing::debug!("replay window full of answered DATA with no checkpoint");
            self.tally.overflows += 1;
            self.ticket = None;
            self.prune();
        }
    }
}

#[cfg(any(test, feature = "model"))]
#[doc(hidden)]
pub mod model;

#[cfg(any(test, feature = "model"))]
#[doc(hidden)]
pub mod hostile;

#[cfg(test)]
mod tests {
    //! The core's guarantees under random interleavings: a model device (DATA with increasing
    //! sequences, PINGs) and model gateways (each answers DATA in order, checkpoints at a
    //! random cadence, pushes, may say GOAWAY, crash, stop answering, or lose what is in
    //! flight) drive one [`Core`] through any number of moves, orders and link checks.
    //! After every step: the device's answers are in order and never twice, never for DATA
    //! it did not send; its PUSHes increase; the ticket never goes backwards; the window stays
    //! bounded. At the end, with a gateway that stays: every DATA was answered exactly once,
    //! and, when every gateway shares the key ring and every move had a ticket to carry, the
    //! app's state moved with the session (REPLY n carries the n-th count). (A move before the
    //! first CHECKPOINT arrives, with answers already delivered, starts the app afresh: the
    //! answered DATA are not replayed to a fresh session, by design.)

    use proptest::prelude::*;
    use wasmbed_protocol::{Frame, Kind};

    use super::model::{Op, World};
    use super::*;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1usize..120).prop_map(Op::Data),
            1 => Just(Op::Ping),
            1 => (1usize..40).prop_map(Op::Split),
            6 => (0usize..6).prop_map(Op::Deliver),
            1 => Just(Op::Push),
            1 => Just(Op::Crash),
            1 => Just(Op::Goaway),
            1 => any::<bool>().prop_map(|answers| Op::Down { answers }),
            1 => Just(Op::Hang),
            1 => any::<bool>().prop_map(Op::Order),
            1 => (0u64..1500).prop_map(Op::Wait),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn every_data_is_answered_once_in_order(
            ops in proptest::collection::vec(op(), 1..120),
            cadence in 0u64..4,
        ) {
            let mut world = World::new(cadence);
            for op in ops {
                world.apply(op);
            }
            world.finish();
            world.verdict();
        }
    }

    /// Whether `buf` still refers to an allocation: an empty `BytesMut` may, with no capacity
    /// left (a new one points nowhere).
    fn holds_storage(buf: &BytesMut) -> bool {
        buf.as_ptr() != BytesMut::new().as_ptr()
    }

    #[test]
    fn a_session_that_carried_messages_holds_no_buffer_once_idle() {
        // DATA, PINGs, their answers and CHECKPOINTs, a DATA in two reads among them; then
        // the core's step after the last write (the loop takes one after every event).
        let mut world = World::new(1);
        for op in [Op::Data(40), Op::Ping, Op::Deliver(5), Op::Data(300)] {
            world.apply(op);
        }
        // The first part of a frame stays buffered (an empty buffer only is freed).
        world.device.sent += 1;
        let split = Frame::new(Kind::Data, world.device.sent, vec![7u8; 100]);
        world.pending.extend_from_slice(&split.encode());
        world.apply(Op::Split(7));
        assert_eq!(
            world.core.io().from_device.len(),
            7,
            "a partial frame is kept"
        );
        world.apply(Op::Split(usize::MAX));
        // Last, a DATA and its answer alone: each written from a buffer allocated to its size.
        for op in [
            Op::Data(5),
            Op::Ping,
            Op::Deliver(10),
            Op::Data(300),
            Op::Deliver(10),
        ] {
            world.apply(op);
        }
        world.settle(Step::Go);
        let c = &mut world.core;
        assert!(c.window.is_empty() && c.pings.is_empty(), "all answered");
        assert_eq!((c.window.capacity(), c.pings.capacity()), (0, 0));
        let io = c.io();
        for (name, buf) in [
            ("from the device", &*io.from_device),
            ("from the gateway", &*io.from_gateway),
            ("to the device", &*io.to_device),
            ("to the gateway", &*io.to_gateway),
        ] {
            assert!(buf.is_empty(), "{name}: bytes left");
            assert!(
                !holds_storage(buf),
                "{name}: an empty buffer kept its allocation"
            );
        }
    }

    #[test]
    fn a_link_that_answers_its_check_stays() {
        let mut world = World::answered();
        world.apply(Op::Down { answers: true });
        assert!(matches!(
            world.core.phase(),
            Phase::Linked {
                check: Check::Pinged { .. },
                ..
            }
        ));
        world.apply(Op::Deliver(5));
        assert!(matches!(
            world.core.phase(),
            Phase::Linked {
                check: Check::Answered { .. },
                ..
            }
        ));
        // Still marked down a second later: checked again; not moved.
        world.apply(Op::Wait(1000));
        assert!(matches!(
            world.core.phase(),
            Phase::Linked {
                check: Check::Pinged { .. },
                ..
            }
        ));
        world.apply(Op::Deliver(5));
        let step = world.core.tick(world.now + LINK_CHECK, true);
        assert_eq!(step, Step::Go);
        assert!(world.core.watching_down());
    }

    #[test]
    fn a_link_that_does_not_answer_moves_the_session() {
        let mut world = World::answered();
        world.apply(Op::Down { answers: false });
        let before = world.core.moved_at();
        world.apply(Op::Wait(999));
        assert_eq!(world.core.moved_at(), before);
        world.apply(Op::Wait(1));
        assert!(
            world.core.moved_at().is_some(),
            "not moved after the check timed out"
        );
    }

    #[test]
    fn a_goaway_during_a_link_check_keeps_the_check() {
        // The gateway is marked down, the proxy PINGs its link, the gateway says GOAWAY
        // before its PONG: the PONG is still the proxy's (the device never sees it), and a
        // gateway that then hangs is moved off when the check times out.
        let mut world = World::answered();
        world.apply(Op::Down { answers: true });
        if let Some(g) = &mut world.gateway {
            // GOAWAY goes out before the PONG to the proxy's PING.
            g.outbox.push_front(Frame::new(Kind::Goaway, 0, []));
        }
        world.deliver(1);
        assert!(matches!(
            world.core.phase(),
            Phase::Going {
                check: Check::Pinged { .. }
            }
        ));
        // The PONG: the proxy's, absorbed (the model device fails on a PONG it did not ask).
        world.deliver(1);
        assert!(matches!(
            world.core.phase(),
            Phase::Going {
                check: Check::Answered { .. }
            }
        ));
        // A second round: GOAWAY, then a hang; the check's deadline moves the session.
        let mut world = World::answered();
        world.apply(Op::Down { answers: false });
        if let Some(g) = &mut world.gateway {
            g.outbox.push_back(Frame::new(Kind::Goaway, 0, []));
        }
        world.deliver(1);
        assert!(world.core.going());
        assert!(world.core.deadline().is_some(), "no deadline while going");
        let moved_before = world.core.moved_at();
        world.apply(Op::Wait(1000));
        assert_ne!(
            world.core.moved_at(),
            moved_before,
            "a hung GOAWAY gateway kept the session"
        );
    }

    /// A session whose device closed its side ends once its last DATA is answered, not before.
    #[test]
    fn a_finished_device_ends_after_its_last_answer() {
        let mut world = World::new(1);
        world.apply(Op::Data(10));
        world.apply(Op::Data(10));
        world.feed_device(usize::MAX);
        world.core.device_finished();
        assert_eq!(world.core.advance(), Step::Go, "ended with answers owed");
        world.deliver(1);
        assert_eq!(world.core.advance(), Step::Go, "ended with one answer owed");
        let g = world.gateway.as_mut().unwrap();
        let last = g
            .outbox
            .iter()
            .position(|f| f.kind == Kind::Reply && f.seq == 2)
            .unwrap();
        for f in g.outbox.drain(..=last).collect::<Vec<_>>() {
            world.core.io().from_gateway.extend_from_slice(&f.encode());
        }
        assert_eq!(world.core.advance(), Step::End(End::Closed));
    }

    #[test]
    fn the_gateways_session_error_ends_the_session_and_reaches_the_device() {
        let mut world = World::new(1);
        let error = ErrorCode::TooManyTraps.frame(0, "traps");
        world
            .core
            .io()
            .from_gateway
            .extend_from_slice(&error.encode());
        assert_eq!(world.core.advance(), Step::End(End::Closed));
        let out = world.core.io().to_device.split();
        assert!(out.ends_with(&error.encode()), "the device was not told");
    }

    #[test]
    fn a_clean_close_without_goaway_is_a_failover() {
        let mut world = World::new(1);
        assert_eq!(world.core.gateway_closed(true), Step::Move(Cause::Failover));
        world.core.device_finished();
        assert_eq!(world.core.gateway_closed(true), Step::End(End::Closed));
    }

    #[test]
    fn device_protocol_violations_are_refused() {
        let cases: [(Vec<Frame>, ErrorCode); 3] = [
            (
                vec![
                    Frame::new(Kind::Data, 2, vec![]),
                    Frame::new(Kind::Data, 2, vec![]),
                ],
                ErrorCode::BadFrame,
            ),
            (
                vec![Frame::control(
                    Kind::Hello,
                    0,
                    &Hello {
                        device: "d".into(),
                        app: "a".into(),
                        resume: None,
                    },
                )],
                ErrorCode::BadHello,
            ),
            (
                vec![Frame::new(Kind::Reply, 1, vec![])],
                ErrorCode::BadFrame,
            ),
        ];
        for (frames, code) in cases {
            let mut world = World::new(1);
            for f in &frames {
                world.core.io().from_device.extend_from_slice(&f.encode());
            }
            match world.core.advance() {
                Step::End(End::Refuse(f)) => {
                    let body: wasmbed_protocol::ErrorBody = f.decode_body("ERROR").unwrap();
                    assert_eq!(body.code, code as u16, "{frames:?}");
                }
                other => panic!("{frames:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_push_sequence_past_the_end_moves_the_session() {
        let mut world = World::new(1);
        world.core.push_offset = 5;
        let push = Frame::new(Kind::Push, u64::MAX - 1, vec![]);
        world
            .core
            .io()
            .from_gateway
            .extend_from_slice(&push.encode());
        assert_eq!(world.core.advance(), Step::Move(Cause::Failover));
    }

    /// What makes the proxy warn once per gateway when a move comes back `fresh`: the session
    /// had state (a ticket, or answers from a gateway that sealed none), not a session moved
    /// before its first answer.
    #[test]
    fn state_to_move_is_a_ticket_or_answers() {
        let mut world = World::new(0);
        assert!(!world.core.has_state_to_move(), "nothing answered yet");
        world.apply(Op::Data(10));
        world.apply(Op::Deliver(5));
        assert!(world.core.has_state_to_move(), "answered, no key ring");
        let world = World::answered();
        assert!(world.core.ticket.is_some() && world.core.has_state_to_move());
    }
}
