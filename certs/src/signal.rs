//! A signal that many tasks wait on, each by one future kept for its life: a token cancelled
//! and replaced at each [`Signal::fire`]. A waiter takes [`Signal::token`] *before* it reads
//! the state the signal is about, so a change after that read cancels the token it waits on.
//! (A `watch` channel says the same, but waiting on one takes a future made afresh for each
//! wait, borrowing its receiver; a session's loop that polls its waits by hand keeps each
//! wait for its life: see the proxy's `anchor::Waits`.) Here, below the proxy and the
//! gateway, because trust installs ([`crate::Reloadable::installs`]) use it as the proxy's
//! gateways do.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Signal {
    current: ArcSwap<CancellationToken>,
}

impl Default for Signal {
    fn default() -> Signal {
        Signal {
            current: ArcSwap::from_pointee(CancellationToken::new()),
        }
    }
}

impl Signal {
    /// Cancelled at the next [`Signal::fire`].
    pub fn token(&self) -> CancellationToken {
        (**self.current.load()).clone()
    }

    /// Wakes every waiter of the token now in place; later waiters get a fresh one.
    pub fn fire(&self) {
        self.current
            .swap(Arc::new(CancellationToken::new()))
            .cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fire_cancels_the_tokens_taken_before_it_only() {
        let signal = Signal::default();
        let before = signal.token();
        signal.fire();
        let after = signal.token();
        assert!(before.is_cancelled());
        assert!(!after.is_cancelled());
        signal.fire();
        assert!(after.is_cancelled());
    }
}
