//! dashboard: the live page of the admin endpoint (`GET /`, `/dashboard`) and its feed,
//! `GET /api/events` (Server-Sent Events).
//!
//! One task builds a snapshot every [`TICK`] while anyone watches — gateways (sessions, capacity, health, drain,
//! time down), spread and its history, rates, the latest events — serializes it once, and
//! publishes the text through a `watch` channel. Every subscriber (a page, a script) gets the
//! same `Arc<str>`: a hundred open tabs cost a hundred socket writes per tick, and nothing on
//! the forwarding path, which only bumps relaxed atomic counters.

#![expect(
    clippy::disallowed_methods,
    reason = "the dashboard's snapshots are made on the admin thread (`dashboard::spawn`)"
)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::events::{Event, event, totals};
use crate::live::Live;

/// How often the snapshot is rebuilt and pushed.
pub const TICK: Duration = Duration::from_millis(500);
/// The spread is sampled for the sparkline every this long ...
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// ... and kept for this many samples (10 minutes).
const HISTORY: usize = 120;

#[derive(Serialize)]
struct GatewayState<'a> {
    name: &'a str,
    pool: &'a str,
    /// `up`, `down` or `draining`.
    state: &'static str,
    sessions: u64,
    /// The gateway's `--max-sessions`, from its http health probe.
    capacity: Option<u64>,
    down_for_s: Option<u64>,
    moving: u64,
    weight: u32,
}

#[derive(Serialize)]
struct Snapshot<'a> {
    at: u64,
    gateways: Vec<GatewayState<'a>>,
    /// Over the gateways taking sessions: max − min and mean.
    spread: i64,
    mean: f64,
    /// `[unix seconds, spread]`, oldest first, one per 5 s over the last 10 minutes.
    spread_history: &'a VecDeque<(u64, i64)>,
    /// Per second, over the last tick.
    accepted_per_s: f64,
    refused_per_s: f64,
    moved_per_s: f64,
    events: Vec<Event>,
}

/// The feed every subscriber reads ([`sse`]). Only subscribers hold its receivers, so the
/// snapshot task can tell that nobody watches and build nothing (an admin endpoint's handle
/// is the sending side's). Its stop ends every subscriber's stream: the sending side lives
/// on in the admin endpoint's handles, so the task's end cannot, and an open dashboard
/// would hold the endpoint's graceful end, and the proxy's stop, for good.
#[derive(Clone)]
pub struct Feed {
    tx: Arc<watch::Sender<Arc<str>>>,
    stop: CancellationToken,
}

impl Feed {
    /// A new subscriber's receiver: the latest snapshot is its first.
    pub fn subscribe(&self) -> watch::Receiver<Arc<str>> {
        self.tx.subscribe()
    }

    /// The latest snapshot (`{}` while nobody watches).
    pub fn latest(&self) -> Arc<str> {
        self.tx.borrow().clone()
    }
}

/// Starts the snapshot task, tracked by `tracker`, on the runtime of `on` (the admin
/// endpoint's thread); returns the feed.
pub fn spawn(
    live: Arc<Live>,
    (tracker, on): (&tokio_util::task::TaskTracker, &tokio::runtime::Handle),
    stop: CancellationToken,
) -> Feed {
    let feed = Feed {
        tx: Arc::new(watch::Sender::new(Arc::from(NOTHING))),
        stop: stop.clone(),
    };
    tracker.spawn_on(run(live, feed.tx.clone(), stop), on);
    feed
}

/// The feed's value while nobody watches: no snapshot, rather than one gone stale.
const NOTHING: &str = "{}";

async fn run(live: Arc<Live>, tx: Arc<watch::Sender<Arc<str>>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut history: VecDeque<(u64, i64)> = VecDeque::with_capacity(HISTORY);
    let mut last_sample: Option<Instant> = None;
    let read = || {
        let t = totals();
        [t.accepted, t.refused, t.moved, t.cut]
    };
    let (mut before, mut then) = (read(), Instant::now());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (now, at) = (read(), Instant::now());
        let secs = at.duration_since(then).as_secs_f64().max(1e-3);
        let delta: Vec<u64> = now
            .iter()
            .zip(before)
            .map(|(n, b)| n.saturating_sub(b))
            .collect();
        (before, then) = (now, at);
        if delta[2] > 0 {
            event(
                "moves",
                None,
                format!("{} sessions moved to other gateways", delta[2]),
            );
        }
        if delta[3] > 0 {
            event(
                "rehomes",
                None,
                format!("{} sessions cut: their devices re-home", delta[3]),
            );
        }
        let snapshot = live.context().gateways.snapshot();
        // The balance is kept within a pool: the spread is the largest within one pool (pools
        // of different sizes never mix), the mean is per gateway taking sessions.
        let taking: Vec<(&str, u64)> = snapshot
            .iter()
            .filter(|g| g.is_healthy() && !g.is_draining())
            .map(|g| (g.pool.as_str(), g.sessions()))
            .collect();
        let mut per_pool: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
        for &(pool, n) in &taking {
            let e = per_pool.entry(pool).or_insert((n, n));
            *e = (e.0.min(n), e.1.max(n));
        }
        let spread = per_pool
            .values()
            .map(|(min, max)| (max - min) as i64)
            .max()
            .unwrap_or(0);
        let mean = if taking.is_empty() {
            0.0
        } else {
            taking.iter().map(|(_, n)| n).sum::<u64>() as f64 / taking.len() as f64
        };
        if last_sample.is_none_or(|t| t.elapsed() >= SAMPLE_EVERY) {
            last_sample = Some(Instant::now());
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back((crate::events::unix_ms() / 1000, spread));
        }
        if tx.receiver_count() == 0 {
            // Nobody watches: build nothing, and keep no snapshot that would be stale by the
            // time the next subscriber reads it (it waits for the next tick's instead).
            if &**tx.borrow() != NOTHING {
                tx.send_replace(Arc::from(NOTHING));
            }
            continue;
        }
        let gateways = snapshot
            .iter()
            .map(|g| GatewayState {
                name: &g.name,
                pool: &g.pool,
                state: if !g.is_healthy() {
                    "down"
                } else if g.is_draining() {
                    "draining"
                } else {
                    "up"
                },
                sessions: g.sessions(),
                capacity: g.reported_capacity(),
                down_for_s: g.down_for().map(|d| d.as_secs()),
                moving: g.moving(),
                weight: g.weight(),
            })
            .collect();
        let events = crate::events::recent();
        let snap = Snapshot {
            at: crate::events::unix_ms(),
            gateways,
            spread,
            mean,
            spread_history: &history,
            accepted_per_s: delta[0] as f64 / secs,
            refused_per_s: delta[1] as f64 / secs,
            moved_per_s: delta[2] as f64 / secs,
            events,
        };
        if let Ok(text) = serde_json::to_string(&snap) {
            tx.send_replace(Arc::from(text));
        }
    }
}

/// `GET /api/events`: the snapshot now, then each new one (`event: snapshot`), as
/// Server-Sent Events, until the admin endpoint stops.
pub fn sse(
    feed: Feed,
) -> axum::response::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, Infallible>>,
> {
    use futures_util::StreamExt;
    let stop = feed.stop.clone();
    let mut feed = feed.subscribe();
    if &**feed.borrow() != NOTHING {
        feed.mark_changed();
    }
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        feed.changed().await.ok()?;
        let text = feed.borrow_and_update().clone();
        let event = axum::response::sse::Event::default()
            .event("snapshot")
            .data(&*text);
        Some((Ok(event), feed))
    })
    .take_until(stop.cancelled_owned());
    axum::response::Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default())
}

/// The page and its assets, embedded in the binary.
pub mod assets {
    pub const PAGE: &str = include_str!("../assets/dashboard.html");
    pub const SCRIPT: &str = include_str!("../assets/dashboard.js");
    pub const UPLOT_JS: &str = include_str!("../assets/vendor/uplot/uPlot.iife.min.js");
    pub const UPLOT_CSS: &str = include_str!("../assets/vendor/uplot/uPlot.min.css");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscriber gets a snapshot at the next tick; once nobody watches, the feed keeps no
    /// snapshot (a stale one) and none is built again. (The admin endpoint's handle is no
    /// subscriber: before, two receivers it kept made every tick build and serialize a
    /// snapshot for nobody, forever.)
    #[tokio::test]
    async fn a_snapshot_is_built_only_while_someone_watches() {
        let control = crate::control::Control::start("test-control").expect("a thread");
        let ctx = crate::context::Context::for_tests();
        let live = Arc::new(Live::new(ctx, CancellationToken::new(), control));
        let (tracker, stop) = (
            tokio_util::task::TaskTracker::new(),
            CancellationToken::new(),
        );
        let on = tokio::runtime::Handle::current();
        let feed = spawn(live, (&tracker, &on), stop.clone());
        let admins_handle = feed.clone();
        let mut watching = feed.subscribe();
        watching.changed().await.expect("a snapshot");
        assert!(
            watching.borrow().contains("\"gateways\""),
            "{}",
            &**watching.borrow()
        );
        drop(watching);
        // The next tick sees nobody: the feed is emptied (bounded: 20 ticks).
        let mut waited = Duration::ZERO;
        while &*admins_handle.latest() != NOTHING {
            assert!(waited < TICK * 20, "a snapshot still built for nobody");
            tokio::time::sleep(TICK / 10).await;
            waited += TICK / 10;
        }
        // And stays so: nothing is built while nobody watches (absence has no signal to
        // wait on: two ticks pass).
        tokio::time::sleep(TICK * 2).await;
        assert_eq!(&*feed.latest(), NOTHING);
        stop.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
