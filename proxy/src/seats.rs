//! One live terminated session per device: when a device whose certificate names it is
//! anchored again while an earlier session of it is still open, the earlier one ends (the
//! newer connection wins, as an MQTT broker's client-id takeover does).
//!
//! Why: a device that reconnects has given its old connection up, but the proxy may not
//! know. A QUIC close is one datagram, lost in a burst (a reconnect storm overflows socket
//! buffers) and never sent by a device that rebooted or lost its network; a TCP peer that
//! vanished sends no FIN. Until its idle timeout (QUIC's 30 s, TCP's `idle_timeout`), such a
//! zombie keeps its connection slot (`--max-connections`: devices refused `full` while their
//! own zombies hold the places), its gateway session (counted by the balancer: the spread is
//! off by the zombies) and its app instance.
//!
//! Trust: only a certificate's identity takes a seat (the HELLO's `device` is checked
//! against it before anything here); without `client_ca` a HELLO's name is a claim, and a
//! claim must not close another device's session. Order: by arrival at the proxy, not by
//! anchoring: an older connection of the device that is anchored after a newer one (a slow
//! first attempt) is the one that ends.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use metrics::gauge;
use wasmbed_certs::Trigger;

use crate::metric_names::SEATS;

/// A connection's arrival, as an order: nanoseconds since the first stamp of this process.
pub(crate) fn stamp(arrived: Instant) -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    // Set by the first `Seats` (a proxy's start), before any connection arrives.
    let base = *BASE.get_or_init(|| arrived);
    u64::try_from(arrived.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

/// A device's app session: its certificate's identity and the HELLO's app (a device may run
/// several apps at once, one session each).
type Key = (Box<str>, Box<str>);

/// The devices' seats: for each device identity and app with a live anchored session, that
/// session's arrival, its seat's id and the trigger that ends it.
pub(crate) struct Seats {
    held: Mutex<HashMap<Key, Seat>>,
    ids: AtomicU64,
}

/// A session's seat, taken by [`Seats::take`]: freed when dropped, if it still holds it.
pub(crate) struct Held<'a> {
    seats: &'a Seats,
    key: Key,
    id: u64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.seats.leave(&self.key, self.id);
    }
}

struct Seat {
    arrival: u64,
    id: u64,
    leave: Trigger,
}

impl Seats {
    /// No seat taken yet; arrivals are stamped from now on ([`stamp`]).
    pub(crate) fn new() -> Seats {
        stamp(Instant::now());
        Seats {
            held: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(0),
        }
    }

    /// The session of `device` and `app` that arrived at `arrival` takes their seat: an
    /// earlier session holding it is told to end (its trigger fired). Returns the seat
    /// (freed when dropped: the session ended, or its task was dropped) and the trigger that
    /// tells this session to end: already fired if a session that arrived later holds it.
    pub(crate) fn take(&self, (device, app): (&str, &str), arrival: u64) -> (Held<'_>, Trigger) {
        let trigger = Trigger::new();
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let seat = Seat {
            arrival,
            id,
            leave: trigger.clone(),
        };
        let key: Key = (device.into(), app.into());
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match held.get_mut(&key) {
            Some(other) if other.arrival > arrival => trigger.fire(),
            Some(other) => {
                other.leave.fire();
                *other = seat;
            }
            None => {
                held.insert(key.clone(), seat);
                gauge!(SEATS).increment(1.0);
            }
        }
        (
            Held {
                seats: self,
                key,
                id,
            },
            trigger,
        )
    }

    /// The session with seat `id` ended: its seat is freed, if it still held it.
    fn leave(&self, key: &Key, id: u64) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.get(key).is_some_and(|s| s.id == id) {
            held.remove(key);
            gauge!(SEATS).decrement(1.0);
        }
    }

    /// Seats held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_arrival_holds_the_seat_whatever_the_order_of_taking() {
        let seats = Seats::new();
        let d1 = ("device-1", "counter");
        let (f, first) = seats.take(d1, 10);
        let (o, other) = seats.take(("device-2", "counter"), 11);
        // The same device's other app has a seat of its own.
        let (a, app) = seats.take(("device-1", "echo"), 12);
        assert!(!first.is_fired() && !other.is_fired() && !app.is_fired());
        // The device's app again, arrived later: the earlier session is told to end.
        let (s, second) = seats.take(d1, 20);
        assert!(first.is_fired(), "the earlier session keeps its seat");
        assert!(!second.is_fired() && !other.is_fired() && !app.is_fired());
        // An attempt that arrived between them, anchored last: it is the one that ends.
        let (l, slow) = seats.take(d1, 15);
        assert!(slow.is_fired(), "an older arrival took the seat");
        assert!(!second.is_fired());
        // The ended sessions leaving do not free the seat of the one that holds it, even
        // with the same arrival stamp.
        drop((f, l));
        let (t, tie) = seats.take(d1, 20);
        assert!(
            second.is_fired() && !tie.is_fired(),
            "a tie: the newcomer wins"
        );
        drop(s);
        assert_eq!(seats.len(), 3);
        drop((t, o, a));
        assert_eq!(seats.len(), 0, "a seat outlived its session");
    }

    /// A session whose task is dropped mid-way (a runtime stopping, an abort) frees its seat
    /// as one that ended does: the seat is its task's.
    #[tokio::test]
    async fn a_dropped_session_frees_its_seat() {
        let seats = std::sync::Arc::new(Seats::new());
        let (entered, entering) = tokio::sync::oneshot::channel();
        let session = tokio::spawn({
            let seats = seats.clone();
            async move {
                let (_seat, token) = seats.take(("device-1", "counter"), 1);
                let _ = entered.send(());
                token.fired().await;
            }
        });
        entering.await.unwrap();
        assert_eq!(seats.len(), 1);
        session.abort();
        assert!(session.await.unwrap_err().is_cancelled());
        assert_eq!(seats.len(), 0, "an aborted session kept its seat");
    }

    #[test]
    fn stamps_follow_arrival() {
        let a = Instant::now();
        let b = a + std::time::Duration::from_millis(1);
        assert!(stamp(a) < stamp(b));
    }
}
