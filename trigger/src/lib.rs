//! A one-shot signal that many tasks wait on, each wait kept for the task's life and polled at
//! every wake-up of it: [`Trigger`] and its wait, [`Fired`].
//!
//! Why not `tokio_util`'s `CancellationToken`: its wait takes two locks at every poll (the
//! token's state, then its `Notify`'s waiter list) and is 72 bytes; a session polls each of
//! its waits at every wake-up of its task, for every byte that moves, and keeps them all for
//! its life. A [`Fired`] is 32 bytes and a poll of one that has not fired reads a flag and
//! compares its waker with the one it registered; only a waker not registered yet (the first
//! poll, or a poll from another task) takes the trigger's lock. Measured:
//! `docs/performance.md` ("One wait object, no locks per wake-up").
//!
//! On its own, with no dependency but `slab`, so that a model checker can run it: built with
//! `--cfg loom` its flag, lock and `Arc` are loom's, and `tests/loom.rs` explores every
//! interleaving of a fire with waits registering, re-registering and dropping (`.ci/run`).
//! `wasmbed_certs::Signal` (fired again and again) hands out one per fire.

#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, Ordering};
#[cfg(loom)]
use loom::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(not(loom))]
use std::sync::{Arc, Mutex, MutexGuard};

use slab::Slab;

/// Fired once; many wait on it ([`Trigger::fired`]). Clones share the one trigger.
#[derive(Clone, Debug)]
pub struct Trigger(Arc<Shared>);

impl Default for Trigger {
    fn default() -> Trigger {
        Trigger(Arc::new(Shared {
            fired: AtomicBool::new(false),
            waiters: Mutex::new(Slab::new()),
        }))
    }
}

#[derive(Debug)]
struct Shared {
    /// Set before the waiters are taken: a waiter that registers after that finds it set
    /// (under the lock), one woken by the fire finds it set (after the wake).
    fired: AtomicBool,
    /// The wakers of the waits not fired yet, each under its wait's key; emptied by the fire.
    waiters: Mutex<Slab<Waker>>,
}

impl Shared {
    fn waiters(&self) -> MutexGuard<'_, Slab<Waker>> {
        // A panic while holding it leaves a slab, still whole: go on with it.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Trigger {
    pub fn new() -> Trigger {
        Trigger::default()
    }

    /// Fires it: every wait on it ends, now and later.
    pub fn fire(&self) {
        self.0.fired.store(true, Ordering::Release);
        let woken: Vec<Waker> = self.0.waiters().drain().collect();
        // Outside the lock: a woken task may run (another thread) and drop its wait. (A
        // waker that panicked would leave the rest unwoken; tokio's do not panic.)
        woken.into_iter().for_each(Waker::wake);
    }

    pub fn is_fired(&self) -> bool {
        self.0.fired.load(Ordering::Acquire)
    }

    /// A wait until it fires, owning a handle to it (kept as long as the waiter likes).
    pub fn fired(&self) -> Fired {
        Fired {
            trigger: self.clone(),
            key: NONE,
            registered: (0, 0),
        }
    }

    /// Waits registered and not fired yet.
    pub fn waiting(&self) -> usize {
        self.0.waiters().len()
    }
}

/// No key: the wait has not registered a waker.
const NONE: usize = usize::MAX;

/// [`Trigger::fired`]: ready once the trigger fired. Dropping it unregisters its waker.
#[must_use = "a wait does nothing unless polled"]
#[derive(Debug)]
pub struct Fired {
    trigger: Trigger,
    /// Its waker's key among the trigger's waiters ([`NONE`]: none registered).
    key: usize,
    /// The waker registered (the clone in the slab), as `Waker::will_wake` compares it (its
    /// data and vtable addresses), never dereferenced.
    registered: (usize, usize),
}

impl Future for Fired {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.trigger.is_fired() {
            return Poll::Ready(());
        }
        let waker = cx.waker();
        if this.key != NONE
            && this.registered == (waker.data() as usize, waker.vtable() as *const _ as usize)
        {
            // That waker is registered: a fire after the flag read above wakes it, and the
            // next poll reads the flag set.
            return Poll::Pending;
        }
        let mut waiters = this.trigger.0.waiters();
        // Under the lock: a fire either took the waiters already (and set the flag before)
        // or will take this waker.
        if this.trigger.is_fired() {
            return Poll::Ready(());
        }
        let replaced = match waiters.get_mut(this.key) {
            Some(slot) => Some(std::mem::replace(slot, waker.clone())),
            None => {
                this.key = waiters.insert(waker.clone());
                None
            }
        };
        // The registered waker's own addresses (a clone keeps them in use while it is held,
        // so no other waker can take them meanwhile).
        let stored = &waiters[this.key];
        this.registered = (stored.data() as usize, stored.vtable() as *const _ as usize);
        // The lock first, then the replaced waker: its drop may run anything.
        drop(waiters);
        drop(replaced);
        Poll::Pending
    }
}

impl Drop for Fired {
    fn drop(&mut self) {
        if self.key != NONE && !self.trigger.is_fired() {
            // A fire between the check and the lock has emptied the slab: nothing to remove.
            // The waker removed is dropped after the lock is released.
            let _removed = self.trigger.0.waiters().try_remove(self.key);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    /// Counts its wakes.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count::default());
        (count.clone(), Waker::from(count))
    }

    /// A wait polled many times by one waker is woken by the fire, and a wait polled last
    /// by another waker wakes that one and not the first: the fast path never leaves the
    /// current waker unregistered, nor an old one registered.
    #[test]
    fn a_fire_wakes_the_waker_of_the_last_poll() {
        let trigger = Trigger::new();
        let mut wait = Box::pin(trigger.fired());
        let (first, first_waker) = waker();
        for _ in 0..3 {
            let poll = wait.as_mut().poll(&mut Context::from_waker(&first_waker));
            assert!(poll.is_pending());
        }
        assert_eq!(trigger.waiting(), 1, "one wait, registered once");
        let (second, second_waker) = waker();
        assert!(
            wait.as_mut()
                .poll(&mut Context::from_waker(&second_waker))
                .is_pending()
        );
        assert_eq!(trigger.waiting(), 1, "its waker replaced, not added");
        trigger.fire();
        assert_eq!(second.0.load(Ordering::SeqCst), 1, "the last poll's waker");
        assert_eq!(first.0.load(Ordering::SeqCst), 0, "the replaced waker");
        assert!(
            wait.as_mut()
                .poll(&mut Context::from_waker(&second_waker))
                .is_ready()
        );
        let mut late = Box::pin(trigger.fired());
        assert!(
            late.as_mut()
                .poll(&mut Context::from_waker(&first_waker))
                .is_ready(),
            "a wait on a fired trigger is ready at once"
        );
        assert_eq!(trigger.waiting(), 0);
    }

    /// A wait dropped before the fire leaves nothing registered (a session's end does not
    /// leave its waker in a trigger every session shares), and later waits reuse the room.
    #[test]
    fn a_dropped_wait_unregisters() {
        let trigger = Trigger::new();
        let (_, w) = waker();
        let mut waits: Vec<_> = (0..3).map(|_| Box::pin(trigger.fired())).collect();
        for wait in &mut waits {
            assert!(
                wait.as_mut()
                    .poll(&mut Context::from_waker(&w))
                    .is_pending()
            );
        }
        assert_eq!(trigger.waiting(), 3);
        drop(waits.remove(1));
        assert_eq!(trigger.waiting(), 2);
        drop(waits);
        assert_eq!(trigger.waiting(), 0);
    }

    /// Clones are one trigger: a wait taken from one is registered with it, and a fire
    /// through another wakes it.
    #[test]
    fn a_fire_through_one_clone_wakes_a_wait_on_another() {
        let trigger = Trigger::new();
        let clone = trigger.clone();
        let mut wait = Box::pin(clone.fired());
        let (count, w) = waker();
        assert!(
            wait.as_mut()
                .poll(&mut Context::from_waker(&w))
                .is_pending()
        );
        assert_eq!(trigger.waiting(), 1);
        trigger.fire();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(wait.as_mut().poll(&mut Context::from_waker(&w)).is_ready());
    }

    /// A waker that, when its last handle goes, records whether its trigger's lock was free.
    struct Probe {
        trigger: Trigger,
        lock_free: Arc<AtomicUsize>,
    }

    impl Wake for Probe {
        fn wake(self: Arc<Self>) {}
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            if self.trigger.0.waiters.try_lock().is_ok() {
                self.lock_free.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// A waker replaced by another, or removed with its wait, is dropped after the trigger's
    /// lock is released: a waker's drop may run anything, a wait on the same trigger too.
    #[test]
    fn wakers_are_dropped_outside_the_lock() {
        let trigger = Trigger::new();
        let lock_free = Arc::new(AtomicUsize::new(0));
        let probe = || {
            Waker::from(Arc::new(Probe {
                trigger: trigger.clone(),
                lock_free: lock_free.clone(),
            }))
        };
        let mut wait = Box::pin(trigger.fired());
        // Replaced: the slab holds the only handle of the first probe when a poll by
        // another waker takes its place.
        let first = probe();
        assert!(
            wait.as_mut()
                .poll(&mut Context::from_waker(&first))
                .is_pending()
        );
        drop(first);
        let second = probe();
        assert!(
            wait.as_mut()
                .poll(&mut Context::from_waker(&second))
                .is_pending()
        );
        assert_eq!(lock_free.load(Ordering::SeqCst), 1, "the replaced waker");
        // Removed: the wait dropped with the slab holding the second probe's only handle.
        drop(second);
        drop(wait);
        assert_eq!(lock_free.load(Ordering::SeqCst), 2, "the removed waker");
    }

    /// A wait is small: a session keeps several for its life.
    #[test]
    fn a_wait_is_32_bytes() {
        assert_eq!(std::mem::size_of::<Fired>(), 32);
    }
}
