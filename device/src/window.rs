//! The resend window: DATA frames not yet covered by a ticket, encoded back to back exactly as
//! they go on the wire, in a region of the caller's memory. Sequences in it are consecutive:
//! the first is `lo`, the last `lo + count - 1`. After a reconnect the whole window is written
//! again (after WELCOME, once what the resumed session covers is pruned); `tx` is how much of
//! it this connection has written, `done` where the last frame wholly written ends (a control
//! frame may go only between two DATA frames).

use wasmbed_protocol::{HEADER, Kind, PREFIX, header_bytes};

#[derive(Debug)]
pub(crate) struct Window {
    /// Bytes in use.
    pub len: usize,
    /// The sequence of the first frame (of the next one pushed when empty).
    pub lo: u64,
    pub count: u64,
    /// Bytes written on this connection.
    tx: usize,
    /// Where the last frame wholly written (or skipped) on this connection ends...
    done: usize,
    /// ...and how many frames that is.
    done_count: u64,
}

/// The encoded length of the frame that starts at `off` (a frame this module wrote).
fn frame_len(mem: &[u8], off: usize) -> usize {
    let p = [mem[off], mem[off + 1], mem[off + 2], mem[off + 3]];
    PREFIX + u32::from_be_bytes(p) as usize
}

impl Window {
    pub fn new(lo: u64) -> Window {
        Window {
            len: 0,
            lo,
            count: 0,
            tx: 0,
            done: 0,
            done_count: 0,
        }
    }

    /// The sequence after the last frame.
    pub fn next(&self) -> u64 {
        self.lo + self.count
    }

    /// Appends DATA `body` (its sequence is [`Window::next`]); false when it does not fit.
    pub fn push(&mut self, mem: &mut [u8], body: &[u8]) -> bool {
        let need = PREFIX + HEADER + body.len();
        if mem.len() - self.len < need {
            return false;
        }
        let h = header_bytes(Kind::Data, self.next(), body.len());
        mem[self.len..self.len + h.len()].copy_from_slice(&h);
        mem[self.len + h.len()..self.len + need].copy_from_slice(body);
        self.len += need;
        self.count += 1;
        true
    }

    /// Whether the first frame can be dropped without cutting a frame on the wire in two:
    /// it is wholly written on this connection (a frame not begun is not dropped here: a
    /// resumed session may still need it).
    pub fn first_is_written(&self) -> bool {
        self.done_count > 0
    }

    /// The highest sequence the peer has on this connection (written wholly, or covered by
    /// the resume that skipped it); `lo - 1` when none.
    pub fn written(&self) -> u64 {
        (self.lo + self.done_count).saturating_sub(1)
    }

    /// Drops every frame with a sequence at or below `through` from the front (the caller
    /// keeps `through` below [`Window::next`]).
    pub fn prune(&mut self, mem: &mut [u8], through: u64) {
        let mut cut = 0;
        let mut k = 0;
        while self.count > k && self.lo + k <= through {
            cut += frame_len(mem, cut);
            k += 1;
        }
        mem.copy_within(cut..self.len, 0);
        self.len -= cut;
        self.lo += k;
        self.count -= k;
        self.tx = self.tx.saturating_sub(cut);
        self.done = self.done.saturating_sub(cut);
        self.done_count = self.done_count.saturating_sub(k);
    }

    /// A new connection: nothing of the window is written on it yet.
    pub fn new_connection(&mut self) {
        (self.tx, self.done, self.done_count) = (0, 0, 0);
    }

    /// What to write next: everything queued (`more`), or only the rest of a frame under way.
    pub fn unsent<'m>(&self, mem: &'m [u8], more: bool) -> &'m [u8] {
        let stop = if more {
            self.len
        } else if self.tx > self.done {
            self.done + frame_len(mem, self.done)
        } else {
            self.tx
        };
        &mem[self.tx..stop]
    }

    /// Whether a control frame may go now (no DATA frame is half written).
    pub fn at_boundary(&self) -> bool {
        self.tx == self.done
    }

    /// `n` bytes of [`Window::unsent`] were written.
    pub fn sent(&mut self, mem: &[u8], n: usize) {
        self.tx = (self.tx + n).min(self.len);
        while self.done < self.len && self.done + frame_len(mem, self.done) <= self.tx {
            self.done += frame_len(mem, self.done);
            self.done_count += 1;
        }
    }
}
