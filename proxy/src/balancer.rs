//! pick: the gateway set and the least-live-sessions balancer, lock-free.
//!
//! The set is an `ArcSwap` snapshot of `Arc<Gateway>`s. Each gateway carries atomics (live
//! sessions, healthy, draining, weight). [`GatewaySet::acquire`] scans the eligible gateways,
//! picks the one whose `(sessions + 1) / weight` is least (ties broken by a rotating start),
//! and commits with a compare-and-swap on that gateway's counter; a lost race rescans. The
//! [`Lease`] it returns gives the count back when dropped, so a count can never leak.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use wasmbed_config::GatewayConfig;
use wasmbed_pick::Load;

use wasmbed_certs::{Signal, Trigger};

/// Where a gateway of the set came from: what may change or remove it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The config file or flags: a reload changes or removes it.
    Config,
    /// `POST /api/gateways`: only the API removes it.
    Api,
    /// DNS discovery, by the source's label (`NAME:PORT`, `srv:NAME`).
    Dns(String),
}

impl Origin {
    pub fn as_str(&self) -> &str {
        match self {
            Origin::Config => "config",
            Origin::Api => "api",
            Origin::Dns(_) => "dns",
        }
    }
}

/// What a session has seen of its gateway's events: cuts (it went down) and orders of moves.
/// Only later ones are news to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seen {
    pub cuts: u32,
    pub orders: u32,
}

/// One gateway behind the proxy, with its live counters.
#[derive(Debug)]
pub struct Gateway {
    pub name: String,
    pub addr: String,
    /// `addr` read once as an IP address and port (`None`: a host name, resolved at each
    /// connect).
    pub socket_addr: Option<std::net::SocketAddr>,
    pub health_addr: Option<String>,
    pub pool: String,
    pub origin: Origin,
    /// It has not passed a probe yet (discovered): its first success brings it up.
    unproven: AtomicBool,
    weight: AtomicU32,
    sessions: Load,
    healthy: AtomicBool,
    /// Drained here: by an operator (admin API) or because it left DNS or the set.
    draining: AtomicBool,
    /// The gateway itself says it drains: its health body (`"status": "draining"`), or a
    /// GOAWAY one of its sessions read. Cleared when a probe finds it serving again.
    drain_reported: AtomicBool,
    /// When it last came up, as milliseconds since [`epoch`] + 1 (0: since start).
    up_since_ms: AtomicU64,
    /// The session count the gateway itself reported on its last http probe (-1: unknown).
    reported_sessions: AtomicI64,
    /// The capacity (`max_sessions`) it reported on its last http probe (-1: unknown).
    reported_capacity: AtomicI64,
    /// When it last went down, as milliseconds since [`epoch`] + 1 (0: not down).
    down_since_ms: AtomicU64,
    /// Fired when the gateway goes down: every passthrough session through it ends.
    cancel: Signal,
    /// Fired at each cut ([`Gateway::cut_sessions`]) and each order of moves: the one wait of
    /// a terminate-mode session on its gateway; [`Gateway::seen`] says which.
    news: Signal,
    cuts: AtomicU32,
    orders: AtomicU32,
    streak: Mutex<Streak>,
    /// What the proxy counts about it: rendered from the set at each scrape, so they leave
    /// `/metrics` with it.
    pub counts: Counts,
    /// Woken when traffic suggests the gateway is failing: its prober probes at once.
    probe_soon: tokio::sync::Notify,
    /// Sessions still to be moved off this gateway (drain by moving, rebalancing): each
    /// session that moves takes one.
    move_quota: AtomicUsize,
    /// The number of moves the latest order asked for ([`Gateway::moves_withdrawn`]).
    last_order: AtomicUsize,
    /// [`Gateway::gone_from_dns`]: milliseconds since `epoch` plus one, 0 for none.
    gone_from_dns_ms: AtomicU64,
    /// Fired when the gateway is removed from the set: its prober stops.
    removed: Trigger,
    /// A move onto it came back `fresh` (the app restarted), and that was logged.
    fresh_noted: AtomicBool,
    /// When a session last read bytes the gateway's process sent (ms since [`epoch`] + 1;
    /// 0: never): evidence from the data plane that it runs.
    heard_ms: AtomicU64,
}

/// What the proxy counts per gateway (`wasmbed_proxy_*_total{gateway}`). Kept by the gateway
/// and rendered from the set at each scrape (`metrics::render`), not registered with the
/// recorder: there, every gateway name ever seen stayed a series until the proxy restarted
/// (gateways found in DNS come and go by address). Counts after the gateway left the set are
/// not shown; what happens to its sessions then is counted by the proxy-wide series (moves).
#[derive(Debug)]
pub struct Counts {
    /// Sessions handed to it.
    pub sessions_started: AtomicU64,
    /// Failed health probes.
    pub probe_failures: AtomicU64,
    /// Failed connects (or link streams).
    pub connect_failures: AtomicU64,
    /// Failed TLS handshakes with it (`[upstream_tls]`).
    pub upstream_tls_failures: AtomicU64,
    /// Health transitions to up, to down.
    pub went_up: AtomicU64,
    pub went_down: AtomicU64,
    /// Sessions the proxy closed, by [`Cancel`] (its index).
    pub cancelled: [AtomicU64; Cancel::ALL.len()],
}

impl Counts {
    pub const fn new() -> Counts {
        Counts {
            sessions_started: AtomicU64::new(0),
            probe_failures: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            upstream_tls_failures: AtomicU64::new(0),
            went_up: AtomicU64::new(0),
            went_down: AtomicU64::new(0),
            cancelled: [const { AtomicU64::new(0) }; Cancel::ALL.len()],
        }
    }

    /// Adds one to `counter` (one of these fields).
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a session the proxy closed.
    pub fn cancelled(&self, cause: Cancel) {
        Counts::bump(&self.cancelled[cause as usize]);
    }
}

impl Default for Counts {
    fn default() -> Counts {
        Counts::new()
    }
}

/// Sessions closed by the proxy before a gateway was theirs (`gateway=""`).
pub static UNASSIGNED: Counts = Counts::new();

/// Why the proxy closed a session (`cause` of `wasmbed_proxy_sessions_cancelled_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// Its gateway went down (passthrough: the session cannot move).
    GatewayDown,
    /// The proxy's hard stop.
    Shutdown,
    /// A newer connection of the device took its session.
    Superseded,
}

impl Cancel {
    pub const ALL: [Cancel; 3] = [Cancel::GatewayDown, Cancel::Shutdown, Cancel::Superseded];

    pub fn label(self) -> &'static str {
        match self {
            Cancel::GatewayDown => "gateway_down",
            Cancel::Shutdown => "shutdown",
            Cancel::Superseded => "superseded",
        }
    }
}

/// Consecutive probe results, for rise/fall.
#[derive(Debug, Default)]
struct Streak {
    successes: u32,
    failures: u32,
}

/// A change of a gateway's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Gateway {
    pub fn new(config: &GatewayConfig) -> Gateway {
        Gateway::with_origin(config, Origin::Config)
    }

    pub fn with_origin(config: &GatewayConfig, origin: Origin) -> Gateway {
        Gateway {
            name: config.name.clone(),
            addr: config.addr.clone(),
            socket_addr: config.addr.parse().ok(),
            health_addr: config.health_addr.clone(),
            pool: config.pool.clone(),
            origin,
            unproven: AtomicBool::new(false),
            weight: AtomicU32::new(config.weight),
            sessions: Load::new(),
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            drain_reported: AtomicBool::new(false),
            up_since_ms: AtomicU64::new(0),
            reported_sessions: AtomicI64::new(-1),
            reported_capacity: AtomicI64::new(-1),
            down_since_ms: AtomicU64::new(0),
            cancel: Signal::default(),
            news: Signal::default(),
            cuts: AtomicU32::new(0),
            orders: AtomicU32::new(0),
            streak: Mutex::new(Streak::default()),
            counts: Counts::new(),
            probe_soon: tokio::sync::Notify::new(),
            move_quota: AtomicUsize::new(0),
            last_order: AtomicUsize::new(0),
            gone_from_dns_ms: AtomicU64::new(0),
            removed: Trigger::new(),
            fresh_noted: AtomicBool::new(false),
            heard_ms: AtomicU64::new(0),
        }
    }

    /// A session read bytes the gateway's process sent (a frame, a WELCOME): it runs. A TCP
    /// connect is no such evidence (the kernel accepts for a stopped process).
    pub fn heard_from(&self) {
        let now = epoch().elapsed().as_millis() as u64 + 1;
        // Relaxed, and only when it moves on: a busy gateway's readers share the line.
        if self.heard_ms.load(Ordering::Relaxed) < now {
            self.heard_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Whether a session heard from the gateway at or after `since`.
    pub fn heard_since(&self, since: Instant) -> bool {
        let at = since.saturating_duration_since(epoch()).as_millis() as u64 + 1;
        self.heard_ms.load(Ordering::Relaxed) >= at
    }

    /// A session moved onto this gateway came back `fresh`: its app restarted, its state
    /// lost. Said once per gateway, at warn: a fleet whose gateways share no key ring
    /// (`--session-keys`) moves every session this way, with no error anywhere else.
    pub fn note_fresh_move(&self, refused: Option<&str>) {
        if !self.fresh_noted.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                gateway = %self.name,
                ticket = refused.unwrap_or("none: the old gateway sealed none"),
                "a session moved here restarted its app (WELCOME without `resumed`): \
                 do the gateways share a key ring (--session-keys)? Said once per gateway"
            );
        }
    }

    /// Resolves once the gateway has been removed from its set.
    pub async fn removed(&self) {
        self.removed.fired().await;
    }

    /// Asks `n` of this gateway's sessions (`usize::MAX`: all) to move to other gateways;
    /// replaces an earlier order. Only terminate-mode sessions can move.
    pub fn order_moves(&self, n: usize) {
        self.last_order.store(n, Ordering::SeqCst);
        self.move_quota.store(n, Ordering::SeqCst);
        // After the quota: a session woken by this finds the order's moves.
        self.orders.fetch_add(1, Ordering::SeqCst);
        self.news.fire();
    }

    /// Fired at the next cut or order of moves: take it before [`Gateway::seen`].
    pub fn news(&self) -> Trigger {
        self.news.trigger()
    }

    /// The cuts and orders of moves so far: a session compares them with what it saw.
    pub fn seen(&self) -> Seen {
        Seen {
            cuts: self.cuts.load(Ordering::SeqCst),
            orders: self.orders.load(Ordering::SeqCst),
        }
    }

    /// [`Gateway::seen`] for a session whose link to it was just made: a drain or a down
    /// that came since the gateway was chosen (eligible then), while the link was made (a
    /// connect, a HELLO and its WELCOME), is kept unseen, so the session's first look acts
    /// on it (an order, then, if its quota has a move left). Not kept in the lease, read
    /// here: a lease is in every session's task, whose size decides its allocation.
    pub fn seen_by_new_session(&self) -> Seen {
        let mut seen = self.seen();
        if self.is_draining() {
            seen.orders = seen.orders.wrapping_sub(1);
        }
        if !self.is_healthy() {
            seen.cuts = seen.cuts.wrapping_sub(1);
        }
        seen
    }

    /// The latest order was to move none (an undrain, a plain drain): it withdraws the
    /// moves its sessions took and have not made yet, not only those still to take.
    pub fn moves_withdrawn(&self) -> bool {
        self.last_order.load(Ordering::SeqCst) == 0
    }

    /// Takes one move from the order, if any is left.
    pub fn take_move(&self) -> bool {
        self.move_quota
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| q.checked_sub(1))
            .is_ok()
    }

    /// Sessions ordered to move and not moved yet (bounded by the sessions it has).
    pub fn moving(&self) -> u64 {
        let quota = self.move_quota.load(Ordering::SeqCst) as u64;
        quota.min(self.sessions())
    }

    /// Traffic suggests this gateway is failing (a failed connect, a session reset on its
    /// side): its health prober probes it now rather than at its next interval.
    pub fn suspect(&self) {
        self.probe_soon.notify_one();
    }

    /// Resolves when [`Gateway::suspect`] was called (once per call, or once for several
    /// calls made while nobody waited).
    pub async fn suspected(&self) {
        self.probe_soon.notified().await;
    }

    pub fn sessions(&self) -> u64 {
        self.sessions.get()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Takes no new session: drained here, or draining by its own word.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.drain_reported.load(Ordering::Acquire)
    }

    /// Its address left its DNS source's answers at `since` (and it drains for that), or
    /// (`None`) is back: a restarted source (a reload) knows it as gone since then, not as
    /// in the answers, and its grace is not restarted.
    pub fn set_gone_from_dns(&self, since: Option<Instant>) {
        let ms = since.map_or(0, |t| {
            u64::try_from(t.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX - 1)
                + 1
        });
        self.gone_from_dns_ms.store(ms, Ordering::Release);
    }

    /// Since when its address has been gone from its DNS source's answers.
    pub fn gone_from_dns(&self) -> Option<Instant> {
        let ms = self.gone_from_dns_ms.load(Ordering::Acquire);
        (ms != 0).then(|| epoch() + Duration::from_millis(ms - 1))
    }

    /// Drained here (admin API, DNS, removal), whatever the gateway says.
    pub fn drained_here(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Whether the gateway itself said it drains (health body or GOAWAY).
    pub fn drain_reported(&self) -> bool {
        self.drain_reported.load(Ordering::Acquire)
    }

    /// Records what the gateway says of its draining; returns whether that changed.
    pub fn set_drain_reported(&self, draining: bool) -> bool {
        self.drain_reported.swap(draining, Ordering::AcqRel) != draining
    }

    /// A refused connect to a gateway that said it drains, while it still has sessions: its
    /// listener closing, as a drain does, not its death (a dead process's connections are
    /// reset by its kernel and end on their own). No health verdict.
    pub fn refusal_is_its_drain(&self, error: &std::io::Error) -> bool {
        error.kind() == std::io::ErrorKind::ConnectionRefused
            && self.drain_reported()
            && self.sessions() > 0
    }

    /// It waits for its first passed probe before it takes a session (set before the
    /// gateway is shared).
    pub fn await_first_probe(&self) {
        self.unproven.store(true, Ordering::SeqCst);
        self.healthy.store(false, Ordering::SeqCst);
    }

    /// It has not passed a probe yet.
    pub fn is_unproven(&self) -> bool {
        self.unproven.load(Ordering::SeqCst)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Changes the weight in place (a reload): live sessions stay, new ones follow it.
    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
    }

    /// This gateway as a config entry (its weight as it is now).
    pub fn config(&self) -> GatewayConfig {
        GatewayConfig {
            name: self.name.clone(),
            addr: self.addr.clone(),
            health_addr: self.health_addr.clone(),
            weight: self.weight(),
            pool: self.pool.clone(),
        }
    }

    /// Whether address, health address and pool equal `config`'s (only the weight may differ
    /// for the gateway to be kept as it is by a reload).
    pub fn same_endpoint(&self, config: &GatewayConfig) -> bool {
        self.addr == config.addr
            && self.health_addr == config.health_addr
            && self.pool == config.pool
    }

    pub fn reported_sessions(&self) -> Option<u64> {
        u64::try_from(self.reported_sessions.load(Ordering::Relaxed)).ok()
    }

    pub fn set_reported_sessions(&self, n: Option<u64>) {
        let v = n.and_then(|n| i64::try_from(n).ok()).unwrap_or(-1);
        self.reported_sessions.store(v, Ordering::Relaxed);
    }

    /// The capacity the gateway reported (its `--max-sessions`), when it did.
    pub fn reported_capacity(&self) -> Option<u64> {
        u64::try_from(self.reported_capacity.load(Ordering::Relaxed)).ok()
    }

    pub fn set_reported_capacity(&self, n: Option<u64>) {
        let v = n.and_then(|n| i64::try_from(n).ok()).unwrap_or(-1);
        self.reported_capacity.store(v, Ordering::Relaxed);
    }

    /// How long it has been down (`None`: up, or never seen up... and then down).
    pub fn down_for(&self) -> Option<Duration> {
        if self.is_healthy() {
            return None;
        }
        let since = self.down_since_ms.load(Ordering::Relaxed);
        (since > 0).then(|| {
            let now = epoch().elapsed().as_millis() as u64;
            Duration::from_millis(now.saturating_sub(since - 1))
        })
    }

    /// Stops (or resumes) giving this gateway new sessions; live ones are left alone.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    fn eligible(&self, pool: &str) -> bool {
        self.pool == pool && self.is_healthy() && !self.is_draining()
    }

    /// The weight in thousandths, reduced while the gateway is in slow start.
    fn effective_weight(&self, slow_ms: u64, now_ms: u64) -> u64 {
        let full = u64::from(self.weight()) * 1000;
        let since = self.up_since_ms.load(Ordering::Relaxed);
        if since == 0 || slow_ms == 0 {
            return full;
        }
        let elapsed = now_ms.saturating_sub(since - 1);
        let permille = (elapsed * 1000 / slow_ms).clamp(100, 1000);
        full * permille / 1000
    }

    /// A session on this gateway starts forwarding: counted started, and the gateway named in
    /// the session's span. One place for every kind of session (passthrough, its takeover
    /// path, a terminated session's link to its gateway).
    pub fn session_started(&self) {
        Counts::bump(&self.counts.sessions_started);
        tracing::Span::current().record("gateway", self.name.as_str());
    }

    /// A trigger fired when this gateway goes down, for a session that holds a lease on it.
    /// `None` when the gateway went down in the meantime.
    pub fn cut_trigger(&self) -> Option<Trigger> {
        let trigger = self.cancel.trigger();
        // Marking down clears `healthy` before it fires the trigger: checking afterwards
        // means a session never keeps a trigger that was swapped out under it.
        self.is_healthy().then_some(trigger)
    }

    /// Cuts every session through this gateway now; later sessions get a fresh trigger.
    pub fn cut_sessions(&self) {
        self.cancel.fire();
        self.cuts.fetch_add(1, Ordering::SeqCst);
        self.news.fire();
    }

    /// Marks this gateway down now, as `fall` failed probes would: its process is known to be
    /// gone (its liveness watch was cut and its admin port refuses). Returns the transition.
    pub fn observe_gone(&self, fall: u32) -> Option<Transition> {
        let mut streak = self.streak.lock().unwrap_or_else(|e| e.into_inner());
        streak.successes = 0;
        streak.failures = streak.failures.max(fall);
        if !self.is_healthy() {
            return None;
        }
        let now = epoch().elapsed().as_millis() as u64;
        self.down_since_ms.store(now + 1, Ordering::Relaxed);
        self.healthy.store(false, Ordering::SeqCst);
        self.cut_sessions();
        Some(Transition::Down)
    }

    /// Takes it on trust, as a gateway without health checks is: up and proven now (a reload
    /// that turns the checks off leaves no prober to bring one down or unproven back).
    /// Returns the transition.
    pub fn take_on_trust(&self) -> Option<Transition> {
        let mut streak = self.streak.lock().unwrap_or_else(|e| e.into_inner());
        streak.failures = 0;
        self.unproven.store(false, Ordering::SeqCst);
        if self.healthy.swap(true, Ordering::SeqCst) {
            return None;
        }
        let now = epoch().elapsed().as_millis() as u64;
        self.up_since_ms.store(now + 1, Ordering::Relaxed);
        Some(Transition::Up)
    }

    /// Records one health result; returns the transition it caused, if any.
    /// Marking down cancels every session through the gateway at once.
    pub fn observe(&self, ok: bool, rise: u32, fall: u32) -> Option<Transition> {
        let mut streak = self.streak.lock().unwrap_or_else(|e| e.into_inner());
        if ok && self.unproven.swap(false, Ordering::SeqCst) {
            // A discovered address: its first passed probe is enough to enter (in slow start).
            streak.successes = rise;
            let now = epoch().elapsed().as_millis() as u64;
            self.up_since_ms.store(now + 1, Ordering::Relaxed);
            self.healthy.store(true, Ordering::SeqCst);
            return Some(Transition::Up);
        }
        if ok {
            streak.failures = 0;
            streak.successes = streak.successes.saturating_add(1);
            if !self.is_healthy() && streak.successes >= rise {
                let now = epoch().elapsed().as_millis() as u64;
                self.up_since_ms.store(now + 1, Ordering::Relaxed);
                self.healthy.store(true, Ordering::SeqCst);
                return Some(Transition::Up);
            }
        } else {
            streak.successes = 0;
            streak.failures = streak.failures.saturating_add(1);
            if self.is_healthy() && streak.failures >= fall {
                let now = epoch().elapsed().as_millis() as u64;
                self.down_since_ms.store(now + 1, Ordering::Relaxed);
                self.healthy.store(false, Ordering::SeqCst);
                self.cut_sessions();
                return Some(Transition::Down);
            }
        }
        None
    }
}

/// A count of one live session on one gateway, given back when dropped.
#[derive(Debug)]
pub struct Lease {
    gateway: Arc<Gateway>,
}

impl Lease {
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.gateway.sessions.release();
    }
}

/// The gateways behind the proxy: a snapshot swapped whole, and the balancer over it.
#[derive(Debug)]
pub struct GatewaySet {
    gateways: ArcSwap<Vec<Arc<Gateway>>>,
    /// Terminate mode: moves ordered and not landed yet (scheduled by the pacer, moving, or
    /// held waiting for a gateway): rebalancing plans only when there are none.
    moves_in_flight: AtomicUsize,
    rotation: AtomicUsize,
    /// `slow_start` in milliseconds (a reload changes it: [`GatewaySet::set_slow_start`]).
    slow_start_ms: AtomicU64,
    /// The proxy is stopping: `/readyz` says 503 so load balancers stop sending, and
    /// terminated sessions are handed back to their devices.
    stopping: Trigger,
    /// Gateways removed from the set while sessions may still run on them (a passthrough
    /// session stays on its removed gateway until it ends): the hard stop cuts them too
    /// ([`GatewaySet::cut_all`]). Each goes with its last session's lease.
    retired: std::sync::Mutex<Vec<std::sync::Weak<Gateway>>>,
}

/// A move ordered and not landed yet: counted in [`GatewaySet::moves_in_flight`] while it
/// lives (dropped when the move lands, fails, or its session ends).
pub struct InFlight(Arc<GatewaySet>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.moves_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl GatewaySet {
    /// Counts a move from now until the returned guard is dropped.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.moves_in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Moves ordered and not landed yet.
    pub fn moves_in_flight(&self) -> usize {
        self.moves_in_flight.load(Ordering::Acquire)
    }

    pub fn new(configs: &[GatewayConfig], slow_start: Duration) -> GatewaySet {
        let gateways = configs.iter().map(|c| Arc::new(Gateway::new(c))).collect();
        GatewaySet {
            gateways: ArcSwap::from_pointee(gateways),
            moves_in_flight: AtomicUsize::new(0),
            rotation: AtomicUsize::new(0),
            slow_start_ms: AtomicU64::new(millis(slow_start)),
            stopping: Trigger::new(),
            retired: std::sync::Mutex::default(),
        }
    }

    /// Cuts every session on every gateway, those removed from the set with sessions still
    /// on them too: the hard stop at a shutdown's end.
    pub fn cut_all(&self) {
        self.snapshot().iter().for_each(|g| g.cut_sessions());
        let retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .for_each(|g| g.cut_sessions());
    }

    /// A reload's `slow_start`: gateways picked from now on ramp in over it.
    pub fn set_slow_start(&self, slow_start: Duration) {
        self.slow_start_ms
            .store(millis(slow_start), Ordering::Relaxed);
    }

    /// The proxy began to stop (SIGTERM, SIGINT): not ready any more.
    pub fn set_stopping(&self) {
        self.stopping.fire();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.is_fired()
    }

    /// Fired when the proxy begins to stop.
    pub fn stopping(&self) -> &Trigger {
        &self.stopping
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Vec<Arc<Gateway>>> {
        self.gateways.load_full()
    }

    /// Adds a gateway to the live set (it enters in slow start, if configured), taken on
    /// trust. `None` when a gateway of that name exists already.
    pub fn add(&self, config: &GatewayConfig) -> Option<Arc<Gateway>> {
        self.add_from(config, Origin::Api, false)
    }

    /// Adds a gateway of `origin`. `unproven`: it takes no session until its first probe
    /// passes (every gateway when health checks are on; with them off it is taken on trust).
    pub fn add_from(
        &self,
        config: &GatewayConfig,
        origin: Origin,
        unproven: bool,
    ) -> Option<Arc<Gateway>> {
        let gateway = Arc::new(Gateway::with_origin(config, origin));
        let now = epoch().elapsed().as_millis() as u64;
        gateway.up_since_ms.store(now + 1, Ordering::Relaxed);
        if unproven {
            gateway.await_first_probe();
        }
        let mut added = false;
        self.gateways.rcu(|current| {
            added = !current.iter().any(|g| g.name == config.name);
            let mut next = (**current).clone();
            if added {
                next.push(gateway.clone());
            }
            next
        });
        added.then_some(gateway)
    }

    /// Removes the gateway named `name` from the live set: no new session goes to it, its
    /// prober stops, and its live sessions are asked to move (terminate mode; passthrough
    /// sessions stay until they end). `None` for an unknown name.
    pub fn remove(&self, name: &str) -> Option<Arc<Gateway>> {
        let mut removed = None;
        self.gateways.rcu(|current| {
            let mut next = (**current).clone();
            removed = next
                .iter()
                .position(|g| g.name == name)
                .map(|i| next.remove(i));
            next
        });
        let gateway = removed?;
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.retain(|g| g.strong_count() > 0);
        retired.push(Arc::downgrade(&gateway));
        drop(retired);
        gateway.set_draining(true);
        gateway.order_moves(usize::MAX);
        gateway.removed.fire();
        Some(gateway)
    }

    pub fn find(&self, name: &str) -> Option<Arc<Gateway>> {
        self.gateways
            .load()
            .iter()
            .find(|g| g.name == name)
            .cloned()
    }

    /// Counts one existing session on the gateway named `name` (a session handed over by the
    /// process this one took over from): `None` when no such gateway is here, or it is not
    /// up. Only a gateway that is up here: another would cut the session at once.
    pub fn lease_on(&self, name: &str) -> Option<Lease> {
        let gateway = self.find(name).filter(|g| g.is_healthy())?;
        gateway.sessions.adopt();
        Some(Lease { gateway })
    }

    /// Whether any gateway of any pool would take a new session.
    pub fn any_eligible(&self) -> bool {
        self.gateways
            .load()
            .iter()
            .any(|g| g.is_healthy() && !g.is_draining())
    }

    /// Takes one session on the least loaded eligible gateway of the first of `pools` that has
    /// one, skipping `exclude`.
    pub fn acquire_first(&self, pools: &[String], exclude: &[Arc<Gateway>]) -> Option<Lease> {
        pools.iter().find_map(|p| self.acquire(p, exclude))
    }

    /// Takes one session on the least loaded eligible gateway of `pool`, skipping `exclude`.
    pub fn acquire(&self, pool: &str, exclude: &[Arc<Gateway>]) -> Option<Lease> {
        let snapshot = self.gateways.load();
        let n = snapshot.len();
        if n == 0 {
            return None;
        }
        let slow_ms = self.slow_start_ms.load(Ordering::Relaxed);
        let now_ms = if slow_ms == 0 {
            0
        } else {
            epoch().elapsed().as_millis() as u64
        };
        // The scan and the compare-and-swap live in `wasmbed_pick` (model-checked with loom).
        let index = wasmbed_pick::claim(
            &snapshot,
            || self.rotation.fetch_add(1, Ordering::Relaxed),
            |g| {
                let eligible = g.eligible(pool) && !exclude.iter().any(|x| Arc::ptr_eq(x, g));
                eligible.then(|| (&g.sessions, g.effective_weight(slow_ms, now_ms)))
            },
        )?;
        Some(Lease {
            gateway: snapshot[index].clone(),
        })
    }
}

/// Milliseconds of `d`, saturating (durations from the config are bounded anyway).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
