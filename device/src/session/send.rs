//! What goes out: HELLO, then DATA from the window with PINGs and PONGs between frames
//! ([`Session::poll_send`], [`Session::sent`]).

use wasmbed_protocol::{HEADER, Kind, PREFIX, header_bytes};

use super::{CTL, Phase, Session};

/// Where the bytes [`Session::poll_send`] gave came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Hello,
    Control,
    /// DATA: everything queued, or (`false`) only the rest of the frame under way.
    Window(bool),
}

impl<B: AsMut<[u8]> + AsRef<[u8]>> Session<B> {
    pub(super) fn queue_control(&mut self, kind: Kind, seq: u64) {
        let c = &mut self.conn;
        if c.control_tx == c.control_len {
            (c.control_len, c.control_tx) = (0, 0);
        }
        let n = PREFIX + HEADER;
        if CTL - c.control_len < n {
            self.stats.dropped_control += 1;
            return;
        }
        c.control[c.control_len..c.control_len + n].copy_from_slice(&header_bytes(kind, seq, 0));
        c.control_len += n;
    }

    /// Where the next bytes to write come from.
    fn source(&self) -> Option<Source> {
        let control = self.conn.control_tx < self.conn.control_len;
        let boundary = self.window.at_boundary();
        match self.phase {
            Phase::Hello { tx, .. } if tx < self.hello_len => Some(Source::Hello),
            Phase::Hello { .. } => control.then_some(Source::Control),
            Phase::Open | Phase::Leaving { .. } if control && boundary => Some(Source::Control),
            // A control frame waits only for the DATA frame under way.
            Phase::Open => Some(Source::Window(!control)),
            // After GOAWAY nothing more goes, not even the rest of a frame: the gateway
            // answers only what it had, and a part of a frame it drops at its close.
            _ => None,
        }
    }

    /// Bytes to write to the connection now (empty: nothing); then [`Session::sent`].
    pub fn poll_send(&mut self) -> &[u8] {
        let source = self.source();
        let mem = self.mem.as_ref();
        let out: &[u8] = match source {
            Some(Source::Hello) => match self.phase {
                Phase::Hello { tx, .. } => &mem[self.layout.hello()][tx..self.hello_len],
                _ => &[],
            },
            Some(Source::Control) => {
                &self.conn.control[self.conn.control_tx..self.conn.control_len]
            }
            Some(Source::Window(more)) => self.window.unsent(&mem[self.layout.window()], more),
            None => &[],
        };
        self.conn.handed = source.map(|s| (s, out.len()));
        out
    }

    /// `n` of the bytes the last [`Session::poll_send`] gave were written.
    pub fn sent(&mut self, n: usize) {
        let Some((source, len)) = self.conn.handed.take() else {
            return;
        };
        let n = n.min(len);
        match source {
            Source::Hello => {
                if let Phase::Hello { since, tx } = self.phase {
                    let tx = (tx + n).min(self.hello_len);
                    self.phase = Phase::Hello { since, tx };
                }
            }
            Source::Control => self.conn.control_tx += n,
            Source::Window(_) => {
                let at = self.layout.window();
                self.window.sent(&self.mem.as_ref()[at], n);
                self.written = self.written.max(self.window.written());
            }
        }
    }
}
