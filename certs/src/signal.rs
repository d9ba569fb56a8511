//! Waits that many tasks hold for their whole life and poll at every wake-up, each poll a flag
//! read while nothing happened.
//!
//! - [`Trigger`]: fired once (a stop, a seat taken, a gateway's cut).
//! - [`Signal`]: fired again and again, a fresh [`Trigger`] after each [`Signal::fire`]. A
//!   waiter takes [`Signal::trigger`] *before* it reads the state the signal is about, so a
//!   change after that read fires the trigger it waits on. (A `watch` channel says the same,
//!   but waiting on one takes a future made afresh for each wait, borrowing its receiver; a
//!   session's loop that polls its waits by hand keeps each wait for its life: see the
//!   proxy's `anchor::Waits`.)
//!
//! [`Trigger`] and [`Fired`] are `wasmbed_trigger`'s (a crate of its own, model-checked).
//!
//! Here, below the proxy and the gateway, because trust installs
//! ([`crate::Reloadable::installs`]) use it as the proxy's gateways and sessions do.

use std::sync::Arc;

use arc_swap::ArcSwap;
pub use wasmbed_trigger::{Fired, Trigger};

/// Fired again and again: each [`Signal::fire`] fires the [`Trigger`] now in place and puts
/// a fresh one there.
#[derive(Debug)]
pub struct Signal {
    current: ArcSwap<Trigger>,
}

impl Default for Signal {
    fn default() -> Signal {
        Signal {
            current: ArcSwap::from_pointee(Trigger::new()),
        }
    }
}

impl Signal {
    /// Fired at the next [`Signal::fire`].
    pub fn trigger(&self) -> Trigger {
        (**self.current.load()).clone()
    }

    /// Wakes every waiter of the trigger now in place; later waiters get a fresh one.
    pub fn fire(&self) {
        self.current.swap(Arc::new(Trigger::new())).fire();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fire_fires_the_triggers_taken_before_it_only() {
        let signal = Signal::default();
        let before = signal.trigger();
        signal.fire();
        let after = signal.trigger();
        assert!(before.is_fired());
        assert!(!after.is_fired());
        signal.fire();
        assert!(after.is_fired());
    }
}
