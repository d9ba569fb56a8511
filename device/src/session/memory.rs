//! Where each part of a session lives in the caller's memory: `[names | hello | window | rx]`.

use core::ops::Range;

use wasmbed_protocol::body::HelloRef;
use wasmbed_protocol::{HEADER, PREFIX};

use crate::Config;

/// Sizes past which a config is refused: no sum of them can overflow.
const MOST: usize = isize::MAX as usize / 8;

#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    device: usize,
    app: usize,
    hello: usize,
    window: usize,
    rx: usize,
}

impl Layout {
    /// The layout for `c`; `None` for sizes no memory could hold.
    pub fn of(c: &Config<'_>) -> Option<Layout> {
        let too_big = [
            c.device.len(),
            c.app.len(),
            c.max_ticket,
            c.window,
            c.max_frame,
        ]
        .iter()
        .any(|n| *n > MOST);
        (!too_big).then(|| Layout {
            device: c.device.len(),
            app: c.app.len(),
            hello: PREFIX + HEADER + HelloRef::max_len(c.device.len(), c.app.len(), c.max_ticket),
            window: c.window,
            rx: PREFIX + c.max_frame,
        })
    }

    pub fn total(&self) -> usize {
        self.device + self.app + self.hello + self.window + self.rx
    }

    pub fn names(&self) -> (Range<usize>, Range<usize>) {
        (0..self.device, self.device..self.device + self.app)
    }

    pub fn hello(&self) -> Range<usize> {
        let at = self.device + self.app;
        at..at + self.hello
    }

    pub fn window(&self) -> Range<usize> {
        let at = self.hello().end;
        at..at + self.window
    }

    pub fn rx(&self) -> Range<usize> {
        let at = self.window().end;
        at..at + self.rx
    }
}

/// The parts of the memory, borrowed apart.
pub(super) struct Parts<'m> {
    pub device: &'m str,
    pub app: &'m str,
    pub hello: &'m mut [u8],
    pub rx: &'m mut [u8],
}

impl Layout {
    pub fn parts<'m>(&self, mem: &'m mut [u8]) -> Parts<'m> {
        let (names, rest) = mem.split_at_mut(self.device + self.app);
        let (hello, rest) = rest.split_at_mut(self.hello);
        let rest = &mut rest[self.window..];
        let (device, app) = names.split_at(self.device);
        Parts {
            // Copied from `&str`s at set-up: valid UTF-8.
            device: core::str::from_utf8(device).unwrap_or_default(),
            app: core::str::from_utf8(app).unwrap_or_default(),
            hello,
            rx: &mut rest[..self.rx],
        }
    }
}
