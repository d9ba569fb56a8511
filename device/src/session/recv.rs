//! What comes in: bytes into the rx region ([`Session::feed`]), frames out of it one at a time
//! as events ([`Session::poll_event`]). An event borrows the frame it came from; the frame is
//! consumed on the next call.

use wasmbed_protocol::body::{CheckpointRef, ErrorRef, WelcomeRef};
use wasmbed_protocol::{ErrorCode, Kind, split};

use super::{Phase, Session};
use crate::{Action, Cause, Event, Resume, Violation};

/// Where a part of a frame sits in the rx region: (offset, length).
type Span = (usize, usize);

/// What reading one frame came to.
enum Read {
    /// No whole frame is there.
    Nothing,
    /// A frame with nothing to tell (a PING answered, a duplicate dropped, a violation).
    Quiet,
    /// An event, its borrowed parts as spans (so the state can change before the event
    /// borrows the memory again).
    Event(Told),
}

enum Told {
    Welcome {
        gateway: Span,
        session: Span,
        resume: Resumed,
    },
    Reply {
        seq: u64,
        body: Span,
    },
    Push {
        seq: u64,
        body: Span,
    },
    Failed {
        seq: u64,
        code: u16,
    },
    Covered {
        seq: u64,
    },
    Checkpoint {
        seq: u64,
    },
    Goaway,
}

enum Resumed {
    New,
    Restored(u64),
    Stateless(u64),
    Refused(Span),
}

/// The span of `part` inside `base` (`part` was read from `base`).
fn span(base: &[u8], part: &[u8]) -> Span {
    (part.as_ptr() as usize - base.as_ptr() as usize, part.len())
}

impl<B: AsMut<[u8]> + AsRef<[u8]>> Session<B> {
    fn rx(&self) -> &[u8] {
        &self.mem.as_ref()[self.layout.rx()]
    }

    fn body(&self, (at, len): Span) -> &[u8] {
        &self.rx()[at..at + len]
    }

    /// The frame the last event borrowed is read.
    fn consume(&mut self) {
        self.conn.rx_start += core::mem::take(&mut self.conn.delivered);
    }

    fn connected_now(&self) -> bool {
        matches!(
            self.phase,
            Phase::Hello { .. } | Phase::Open | Phase::Leaving { .. }
        )
    }

    /// Bytes received at `now`; how many were taken (the rest: feed them again after
    /// [`Session::poll_event`] has given its events). Bytes arriving while no connection is
    /// open (the session is closing it) are dropped.
    pub fn feed(&mut self, bytes: &[u8], now: u64) -> usize {
        self.consume();
        if !self.connected_now() {
            return bytes.len();
        }
        let (start, end) = (self.conn.rx_start, self.conn.rx_end);
        let at = self.layout.rx();
        let rx = &mut self.mem.as_mut()[at];
        rx.copy_within(start..end, 0);
        let end = end - start;
        let n = bytes.len().min(rx.len() - end);
        rx[end..end + n].copy_from_slice(&bytes[..n]);
        (self.conn.rx_start, self.conn.rx_end) = (0, end + n);
        // A whole frame is here: the peer is alive, and no PING is owed an answer. Bytes of
        // a frame still coming are not (one byte now and then would keep a peer that never
        // finishes a frame, and never answers, alive for good).
        if n > 0 && matches!(split(&rx[..end + n], self.max_frame), Ok(Some(_))) {
            self.conn.last_rx = now;
            self.conn.ping = None;
        }
        n
    }

    /// The next event for the application, if any. Call it until `None` after every
    /// [`Session::feed`], [`Session::closed`] and [`Session::handle_timeout`].
    pub fn poll_event(&mut self) -> Option<Event<'_>> {
        self.consume();
        if let Some(cause) = self.note.take() {
            return Some(Event::Disconnected { cause });
        }
        loop {
            if self.covered_to > self.answered {
                self.answered += 1;
                return Some(Event::Covered { seq: self.answered });
            }
            if self.lost_to > self.answered {
                self.answered += 1;
                return Some(Event::Lost { seq: self.answered });
            }
            match self.next_frame() {
                Read::Quiet => continue,
                Read::Event(told) => return Some(self.event(told)),
                Read::Nothing => break,
            }
        }
        // Every frame read. After GOAWAY, once every DATA this connection wrote has its
        // answer, the device leaves (a stopping proxy waits for it to close).
        if matches!(self.phase, Phase::Leaving { .. }) && self.answered >= self.window.written() {
            self.close(Cause::Goaway);
        }
        None
    }

    fn event(&self, told: Told) -> Event<'_> {
        let bytes = |(at, len): Span| &self.rx()[at..at + len];
        // Spans of text were read as UTF-8 by the body reader.
        let text = |s: Span| core::str::from_utf8(bytes(s)).unwrap_or_default();
        match told {
            Told::Welcome {
                gateway,
                session,
                resume,
            } => Event::Welcome {
                gateway: text(gateway),
                session: text(session),
                resume: match resume {
                    Resumed::New => Resume::New,
                    Resumed::Restored(seq) => Resume::Restored { seq },
                    Resumed::Stateless(seq) => Resume::Stateless { seq },
                    Resumed::Refused(reason) => Resume::Refused {
                        reason: text(reason),
                    },
                },
            },
            Told::Reply { seq, body } => Event::Reply {
                seq,
                body: bytes(body),
            },
            Told::Push { seq, body } => Event::Push {
                seq,
                body: bytes(body),
            },
            Told::Failed { seq, code } => Event::Failed { seq, code },
            Told::Covered { seq } => Event::Covered { seq },
            Told::Checkpoint { seq } => Event::Checkpoint { seq },
            Told::Goaway => Event::Goaway,
        }
    }

    /// Reads the next frame and acts on it.
    fn next_frame(&mut self) -> Read {
        if !self.connected_now() {
            return Read::Nothing;
        }
        let rx = self.rx();
        let (start, end) = (self.conn.rx_start, self.conn.rx_end);
        let (kind, seq, body, used) = match split(&rx[start..end], self.max_frame) {
            Ok(Some((f, used))) => (f.kind, f.seq, span(rx, f.body), used),
            Ok(None) => return Read::Nothing,
            Err(e) => return self.violation(Violation::Frame(e.code())),
        };
        let welcomed = self.conn.welcomed;
        let read = match kind {
            Kind::Ping => {
                self.queue_control(Kind::Pong, seq);
                Read::Quiet
            }
            Kind::Pong => Read::Quiet,
            Kind::Welcome if !welcomed => return self.welcome(body, used),
            Kind::Error if seq == 0 => self.refused(body),
            Kind::Reply | Kind::Error if welcomed => return self.answer(kind, seq, body, used),
            Kind::Push if welcomed => {
                self.conn.delivered = used;
                return Read::Event(Told::Push { seq, body });
            }
            Kind::Checkpoint if welcomed => self.checkpoint(seq, body),
            Kind::Goaway => self.goaway(),
            other => self.violation(Violation::Unexpected(other as u8)),
        };
        self.conn.rx_start += used;
        read
    }

    fn violation(&mut self, v: Violation) -> Read {
        self.close(Cause::Violation(v));
        Read::Quiet
    }

    fn goaway(&mut self) -> Read {
        match self.phase {
            // Nothing was welcomed, so nothing is owed: go (and back off: a gateway that
            // drains refuses new sessions).
            Phase::Hello { .. } => {
                self.close(Cause::Goaway);
                Read::Event(Told::Goaway)
            }
            Phase::Open => {
                self.phase = Phase::Leaving {
                    since: self.conn.last_rx,
                };
                Read::Event(Told::Goaway)
            }
            _ => Read::Quiet,
        }
    }

    fn welcome(&mut self, body: Span, used: usize) -> Read {
        if !matches!(self.phase, Phase::Hello { tx, .. } if tx == self.hello_len) {
            return self.violation(Violation::Unexpected(Kind::Welcome as u8));
        }
        let rx = self.rx();
        let Ok(w) = WelcomeRef::decode(self.body(body)) else {
            return self.violation(Violation::Body);
        };
        let (gateway, session) = (
            span(rx, w.gateway.as_bytes()),
            span(rx, w.session.as_bytes()),
        );
        let resumed = w.resumed.map(|r| (r.seq, r.state == "restored"));
        let refused = w.resume_refused.map(|r| span(rx, r.as_bytes()));
        let resume = match resumed {
            Some((r, restored)) => match self.resume_at(r) {
                Some(()) if restored => Resumed::Restored(r),
                Some(()) => Resumed::Stateless(r),
                None => {
                    self.drop_ticket();
                    return self.violation(Violation::Resume);
                }
            },
            None => {
                let presented = self.ticket.is_some();
                self.start_fresh();
                match (presented, refused) {
                    (true, Some(reason)) => Resumed::Refused(reason),
                    (true, None) => Resumed::Refused((0, 0)),
                    (false, _) => Resumed::New,
                }
            }
        };
        if self.welcomes > 0 {
            self.stats.resent += self.window.count;
        }
        self.welcomes += 1;
        self.conn.welcomed = true;
        self.phase = Phase::Open;
        self.conn.delivered = used;
        Read::Event(Told::Welcome {
            gateway,
            session,
            resume,
        })
    }

    /// WELCOME resumed after DATA `r`: it must be where the presented ticket left off, or
    /// later but only over DATA already written; then what it covers leaves the window and
    /// the rest goes again. `None`: it does not fit.
    fn resume_at(&mut self, r: u64) -> Option<()> {
        let t = self.ticket?.2;
        if r < t || r > self.written || r.saturating_add(1) < self.window.lo {
            return None;
        }
        let (window, mem) = self.window();
        window.prune(mem, r);
        // Answered above `r`: sent again for the state, their second answers expected.
        self.replay = (r, self.answered.max(r));
        self.covered_to = self.covered_to.max(r);
        Some(())
    }

    /// A session without the ticket's state: what was answered has no state to go into;
    /// what a ticket covered but was never answered is lost with that state; the rest goes
    /// again.
    fn start_fresh(&mut self) {
        self.drop_ticket();
        let answered = self.answered;
        let (window, mem) = self.window();
        window.prune(mem, answered);
        self.lost_to = self.lost_to.max(self.window.lo - 1);
        self.replay = (0, 0);
    }

    /// ERROR about the whole session (sequence 0).
    fn refused(&mut self, body: Span) -> Read {
        let Ok(e) = ErrorRef::decode(self.body(body)) else {
            return self.violation(Violation::Body);
        };
        let code = e.code;
        self.close(Cause::Refused {
            code,
            action: Action::of(code),
        });
        Read::Quiet
    }

    /// REPLY or ERROR `seq`: the answer to a DATA, given to the application once.
    fn answer(&mut self, kind: Kind, seq: u64, body: Span, used: usize) -> Read {
        let code = match kind {
            Kind::Error => match ErrorRef::decode(self.body(body)) {
                Ok(e) => Some(e.code),
                Err(_) => {
                    self.conn.rx_start += used;
                    return self.violation(Violation::Body);
                }
            },
            _ => None,
        };
        if seq > self.window.written() || seq <= self.answered {
            if seq > self.window.written() {
                self.stats.unsent_answers += 1;
            } else if self.replay.0 < seq && seq <= self.replay.1 && seq > self.conn.answered {
                // Resent after a resume for its effect on the state: answered before.
                self.stats.replays += 1;
                self.conn.answered = seq;
            } else {
                self.stats.duplicates += 1;
            }
            self.conn.rx_start += used;
            return Read::Quiet;
        }
        if seq > self.answered + 1 {
            // The peer skipped DATA: those are lost; this answer waits for their events.
            self.lost_to = seq - 1;
            return Read::Quiet;
        }
        self.answered = seq;
        self.conn.answered = seq;
        self.conn.progress = true;
        let Some(code) = code else {
            self.conn.delivered = used;
            return Read::Event(Told::Reply { seq, body });
        };
        self.conn.rx_start += used;
        Read::Event(if code == ErrorCode::Duplicate as u16 {
            Told::Covered { seq }
        } else {
            Told::Failed { seq, code }
        })
    }

    fn checkpoint(&mut self, seq: u64, body: Span) -> Read {
        let Ok(c) = CheckpointRef::decode(self.body(body)) else {
            return self.violation(Violation::Body);
        };
        let (at, len) = span(self.rx(), c.ticket);
        if self.ticket.is_some_and(|t| seq < t.2) {
            self.stats.stale_checkpoints += 1;
            return Read::Quiet;
        }
        // It may cover only DATA this connection's session has.
        if seq > self.window.written() {
            self.stats.unsent_checkpoints += 1;
            return Read::Quiet;
        }
        if len > self.max_ticket {
            self.stats.oversized_tickets += 1;
            return Read::Quiet;
        }
        self.write_hello(Some((at, len, seq)));
        let (window, mem) = self.window();
        window.prune(mem, seq);
        Read::Event(Told::Checkpoint { seq })
    }
}
