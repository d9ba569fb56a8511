//! Model check of [`Trigger`] with loom: every interleaving of a fire with waits that register,
//! register again with another waker, and drop. Run by `.ci/run`:
//!
//!     RUSTFLAGS="--cfg loom" cargo test -p wasmbed-trigger --release --test loom
//!
//! A lost wake-up shows as a deadlock: loom's `block_on` parks the thread until its waker is
//! woken, and loom fails a model in which no thread can go on. Checked when written: with the
//! fire taking the waiters before it sets the flag, every test here but the last fails (a
//! wait registers between the two and is never woken).
#![cfg(loom)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use loom::future::block_on;
use loom::thread;
use wasmbed_trigger::{Fired, Trigger};

/// A wait on `trigger` polled once with a waker that wakes no one: registered, as after a
/// first poll from another task.
fn registered(trigger: &Trigger) -> Pin<Box<Fired>> {
    let mut wait = Box::pin(trigger.fired());
    let poll = wait.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    assert_eq!(poll, Poll::Pending);
    wait
}

/// Fires `trigger` on a thread of its own.
fn fire_elsewhere(trigger: &Trigger) -> thread::JoinHandle<()> {
    let firing = trigger.clone();
    thread::spawn(move || firing.fire())
}

/// A wait blocked on a trigger that another thread fires ends, whatever the interleaving of
/// its registration with the fire.
#[test]
fn a_fire_from_another_thread_ends_the_wait() {
    loom::model(|| {
        let trigger = Trigger::new();
        let fire = fire_elsewhere(&trigger);
        block_on(trigger.fired());
        fire.join().unwrap();
        assert_eq!(trigger.waiting(), 0);
    });
}

/// A wait registered by one waker and then polled by another while the fire runs: the new
/// waker is the one woken.
#[test]
fn a_wait_polled_again_by_another_waker_during_the_fire_is_woken() {
    loom::model(|| {
        let trigger = Trigger::new();
        let wait = registered(&trigger);
        let fire = fire_elsewhere(&trigger);
        block_on(wait);
        fire.join().unwrap();
        assert_eq!(trigger.waiting(), 0);
    });
}

/// A wait dropped, then the trigger fired, while another thread registers a wait that may
/// take the key the drop frees: that wait is woken, and nothing stays registered.
#[test]
fn a_key_freed_and_taken_again_during_a_registration_wakes_its_new_owner() {
    loom::model(|| {
        let trigger = Trigger::new();
        let first = registered(&trigger);
        let waiting = trigger.clone();
        let second = thread::spawn(move || block_on(waiting.fired()));
        drop(first);
        trigger.fire();
        second.join().unwrap();
        assert_eq!(trigger.waiting(), 0);
    });
}

/// A wait dropped while the trigger fires on another thread leaves nothing registered.
#[test]
fn a_wait_dropped_during_a_fire_leaves_nothing() {
    loom::model(|| {
        let trigger = Trigger::new();
        let wait = registered(&trigger);
        let fire = fire_elsewhere(&trigger);
        drop(wait);
        fire.join().unwrap();
        assert_eq!(trigger.waiting(), 0);
    });
}
