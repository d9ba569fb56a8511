//! What comes in: bytes into the rx region ([`Session::feed`]), frames out of it one at a time
//! as events ([`Session::poll_event`]). An event borrows the frame it came from; the frame is
//! consumed on the next call.

use wasmbed_protocol::body::{CheckpointRef, ErrorRef, WelcomeRef};
use wasmbed_protocol::{ErrorCode, Kind, split};

use super::{Phase, Session};
use crate::{Action, Cause, Event, Resume, Violation};

/// Where a part of a frame sits in the rx region: (offset, length).
type Span = (usize, usize);

/// What a frame came to. Borrowed parts are spans, so that the state can change before the
/// event borrows the memory again.
enum Out {
    /// Nothing to tell (a PING answered, a duplicate dropped, the connection closing).
    Nothing,
    Welcome {
        gateway: Span,
        session: Span,
        resume: ResumeOut,
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

enum ResumeOut {
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
        let l = self.layout;
        &self.mem.as_ref()[l.device + l.app + l.hello + l.window..][..l.rx]
    }

    /// The frame the last event borrowed is read.
    fn consume(&mut self) {
        self.rx_start += core::mem::take(&mut self.delivered);
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
        let (start, end) = (self.rx_start, self.rx_end);
        let rx = self.parts().rx;
        if start > 0 {
            rx.copy_within(start..end, 0);
        }
        let end = end - start;
        let n = bytes.len().min(rx.len() - end);
        rx[end..end + n].copy_from_slice(&bytes[..n]);
        (self.rx_start, self.rx_end) = (0, end + n);
        if n > 0 {
            // The peer is alive: no PING is owed an answer.
            self.last_rx = now;
            self.ping = None;
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
            let out = self.next_frame()?;
            if !matches!(out, Out::Nothing) {
                return Some(self.event(out));
            }
        }
    }

    /// The event for `out` (never [`Out::Nothing`]: `poll_event` reads on instead).
    fn event(&self, out: Out) -> Event<'_> {
        let rx = self.rx();
        let bytes = |(at, len): Span| &rx[at..at + len];
        // Spans of text were read as UTF-8 by the body reader.
        let text = |s: Span| core::str::from_utf8(bytes(s)).unwrap_or_default();
        match out {
            Out::Nothing | Out::Goaway => Event::Goaway,
            Out::Welcome {
                gateway,
                session,
                resume,
            } => Event::Welcome {
                gateway: text(gateway),
                session: text(session),
                resume: match resume {
                    ResumeOut::New => Resume::New,
                    ResumeOut::Restored(seq) => Resume::Restored { seq },
                    ResumeOut::Stateless(seq) => Resume::Stateless { seq },
                    ResumeOut::Refused(reason) => Resume::Refused {
                        reason: text(reason),
                    },
                },
            },
            Out::Reply { seq, body } => Event::Reply {
                seq,
                body: bytes(body),
            },
            Out::Push { seq, body } => Event::Push {
                seq,
                body: bytes(body),
            },
            Out::Failed { seq, code } => Event::Failed { seq, code },
            Out::Covered { seq } => Event::Covered { seq },
            Out::Checkpoint { seq } => Event::Checkpoint { seq },
        }
    }

    /// Reads the next frame and acts on it; `None` when no whole frame is there.
    fn next_frame(&mut self) -> Option<Out> {
        if !self.connected_now() {
            return None;
        }
        let rx = self.rx();
        let (kind, seq, body, used) = match split(&rx[self.rx_start..self.rx_end], self.max_frame) {
            Ok(Some((f, used))) => (f.kind, f.seq, span(rx, f.body), used),
            Ok(None) => return None,
            Err(e) => return Some(self.violation(Violation::Frame(e.code()))),
        };
        let open = matches!(self.phase, Phase::Open | Phase::Leaving { .. });
        let out = match kind {
            Kind::Ping => {
                self.queue_ctl(Kind::Pong, seq);
                Out::Nothing
            }
            Kind::Pong => Out::Nothing,
            Kind::Welcome => return Some(self.welcome(body, used)),
            Kind::Error if seq == 0 => self.refused(body),
            Kind::Reply | Kind::Error if open => return Some(self.answer(kind, seq, body, used)),
            Kind::Push if open => {
                self.delivered = used;
                return Some(Out::Push { seq, body });
            }
            Kind::Checkpoint if open => self.checkpoint(seq, body),
            Kind::Goaway => {
                if !matches!(self.phase, Phase::Leaving { .. }) {
                    self.phase = Phase::Leaving {
                        since: self.last_rx,
                    };
                }
                Out::Goaway
            }
            other => self.violation(Violation::Unexpected(other as u8)),
        };
        self.rx_start += used;
        Some(out)
    }

    fn violation(&mut self, v: Violation) -> Out {
        self.close(Cause::Violation(v));
        Out::Nothing
    }

    fn body(&self, (at, len): Span) -> &[u8] {
        &self.rx()[at..at + len]
    }

    fn welcome(&mut self, body: Span, used: usize) -> Out {
        let sent_hello = matches!(self.phase, Phase::Hello { tx, .. } if tx == self.hello_len);
        if !sent_hello {
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
        let restored = w.resumed.map(|r| (r.seq, r.state == "restored"));
        let refused = w.resume_refused.map(|r| span(rx, r.as_bytes()));
        let presented = self.ticket.is_some();
        let resume = match restored {
            Some((r, restored)) => {
                // It must resume where this device's window can go on from: at or after the
                // ticket's DATA, before the next one to send.
                if !presented || r.saturating_add(1) < self.window.lo || r >= self.window.next() {
                    self.drop_ticket();
                    return self.violation(Violation::Resume);
                }
                let (window, mem) = self.window();
                window.prune(mem, r);
                window.rewind(mem, r);
                self.covered_to = self.covered_to.max(r);
                if restored {
                    ResumeOut::Restored(r)
                } else {
                    ResumeOut::Stateless(r)
                }
            }
            None => {
                self.drop_ticket();
                // A new session: what was answered has no state to go into; what was not
                // goes again.
                let answered = self.answered;
                let (window, mem) = self.window();
                window.prune(mem, answered);
                let first = window.lo.saturating_sub(1);
                window.rewind(mem, first);
                match (presented, refused) {
                    (true, Some(reason)) => ResumeOut::Refused(reason),
                    (true, None) => ResumeOut::Refused((0, 0)),
                    (false, _) => ResumeOut::New,
                }
            }
        };
        self.stats.resent += self.window.count;
        self.phase = Phase::Open;
        self.delivered = used;
        Out::Welcome {
            gateway,
            session,
            resume,
        }
    }

    /// ERROR about the whole session (sequence 0).
    fn refused(&mut self, body: Span) -> Out {
        let Ok(e) = ErrorRef::decode(self.body(body)) else {
            return self.violation(Violation::Body);
        };
        let code = e.code;
        self.close(Cause::Refused {
            code,
            action: Action::of(code),
        });
        Out::Nothing
    }

    /// REPLY or ERROR `seq`: the answer to a DATA, given to the application once.
    fn answer(&mut self, kind: Kind, seq: u64, body: Span, used: usize) -> Out {
        let code = match kind {
            Kind::Error => match ErrorRef::decode(self.body(body)) {
                Ok(e) => Some(e.code),
                Err(_) => {
                    self.rx_start += used;
                    return self.violation(Violation::Body);
                }
            },
            _ => None,
        };
        let next = self.window.next();
        if seq <= self.answered || seq >= next {
            if seq >= next {
                self.stats.ignored += 1;
            } else if seq > self.conn_answered {
                // Resent after a resume for its effect on the state: answered before.
                self.stats.replays += 1;
                self.conn_answered = seq;
            } else {
                self.stats.duplicates += 1;
            }
            self.rx_start += used;
            return Out::Nothing;
        }
        if seq > self.answered + 1 {
            // The peer skipped DATA: those are lost; this answer waits for their events.
            self.lost_to = seq - 1;
            return Out::Nothing;
        }
        self.answered = seq;
        self.conn_answered = seq;
        self.progress = true;
        match code {
            None => {
                self.delivered = used;
                Out::Reply { seq, body }
            }
            Some(code) => {
                self.rx_start += used;
                if code == ErrorCode::Duplicate as u16 {
                    Out::Covered { seq }
                } else {
                    Out::Failed { seq, code }
                }
            }
        }
    }

    fn checkpoint(&mut self, seq: u64, body: Span) -> Out {
        let Ok(c) = CheckpointRef::decode(self.body(body)) else {
            return self.violation(Violation::Body);
        };
        let ticket = span(self.rx(), c.ticket);
        if self.ticket.is_some_and(|t| seq < t.2) {
            self.stats.stale_checkpoints += 1;
            return Out::Nothing;
        }
        // It may cover only DATA this connection's session has.
        if seq > self.window.written() {
            self.stats.ignored += 1;
            return Out::Nothing;
        }
        if ticket.1 > self.max_ticket {
            self.stats.oversized_tickets += 1;
            return Out::Nothing;
        }
        self.write_hello(Some((ticket.0, ticket.1, seq)));
        let (window, mem) = self.window();
        window.prune(mem, seq);
        Out::Checkpoint { seq }
    }
}
