//! context: what every session of one config shares: the config, the gateway set, the device
//! trust, the connector towards gateways, the links, the meters, the move pacer. A reload
//! makes a new one ([`Context::next`]); a session keeps the one it started with.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::counter;
use wasmbed_certs::Trigger;
use wasmbed_config::{ProxyConfig, RouteConfig};

use crate::balancer::GatewaySet;
use crate::metric_names::{ROUTED, SESSIONS_BY_ALPN};
use crate::metrics::Meters;
use crate::tls::{DeviceTls, TlsSetup};

/// Everything a session needs, shared by all of them: the config in force when the session
/// started (a reload makes a new `Context` for later sessions, sharing the live parts).
pub struct Context {
    pub config: ProxyConfig,
    pub gateways: Arc<GatewaySet>,
    pub device_tls: Arc<DeviceTls>,
    pub connector: Option<Arc<rustls::ClientConfig>>,
    /// `--upstream link`: the links to the gateways (shared by every context of a run).
    pub links: Option<Arc<crate::link::Links>>,
    /// Fired when the shutdown grace period is over (every gateway's session trigger is
    /// fired with it): tells a cut session that the cause was shutdown.
    pub hard_stop: Trigger,
    pub meters: Meters,
    /// Sessions routed by each of `config.routes`, then by the default pool.
    pub routed: Vec<metrics::Counter>,
    /// The pools each of `config.routes` sends a session to (its pool, its fallbacks, the
    /// default pool), then the default route's: made once, shared by its sessions.
    pub route_pools: Vec<Pools>,
    pub alpn: AlpnCounts,
    /// Spaces the moves of drains and rebalancing (`--move-rate`).
    pub pacer: Arc<crate::context::Pacer>,
    /// `--takeover`: where passthrough sessions go when a new process takes over.
    pub handover: Option<Arc<crate::takeover::Handover>>,
    /// Each device's one live terminated session (shared by every context of a run).
    pub(crate) seats: Arc<crate::seats::Seats>,
    /// Where a connection's bounds while it opens are armed (shared by every context of a
    /// run): [`crate::deadlines`].
    pub deadlines: crate::deadlines::Deadlines,
}

#[cfg(test)]
impl Context {
    /// A context for tests: the default config with one gateway at 127.0.0.1:1 (never
    /// dialled), its deadlines armed in the test's runtime.
    pub(crate) fn for_tests() -> Context {
        let config = wasmbed_config::ProxyConfig::from_toml("[[gateway]]\naddr = \"127.0.0.1:1\"")
            .expect("the test config");
        let gateways = Arc::new(crate::balancer::GatewaySet::new(
            &config.gateways,
            std::time::Duration::ZERO,
        ));
        let device_tls = Arc::new(crate::tls::DeviceTls::load(&config).expect("no TLS files"));
        Context::new(
            config,
            gateways,
            (device_tls, None),
            wasmbed_certs::Trigger::new(),
            crate::deadlines::Deadlines::default(),
        )
    }
}

impl Context {
    pub fn new(
        config: ProxyConfig,
        gateways: Arc<GatewaySet>,
        (device_tls, connector): TlsSetup,
        hard_stop: Trigger,
        deadlines: crate::deadlines::Deadlines,
    ) -> Context {
        let routed = config
            .routes
            .iter()
            .map(|r| r.pool.clone())
            .chain([wasmbed_config::proxy::DEFAULT_POOL.to_string()])
            .map(|pool| counter!(ROUTED, "pool" => pool))
            .collect();
        let alpn = AlpnCounts::new(&config.routes);
        let route_pools = route_pools(&config.routes);
        Context {
            pacer: Arc::new(crate::context::Pacer::new(config.migration.move_rate)),
            seats: Arc::new(crate::seats::Seats::new()),
            alpn,
            config,
            gateways,
            device_tls,
            connector,
            links: None,
            hard_stop,
            meters: Meters::new(),
            routed,
            route_pools,
            handover: None,
            deadlines,
        }
    }

    /// The context of a reloaded `config`: the same gateways, device TLS, hard stop and
    /// pacer (set to the new rate), the new settings and upstream connector.
    pub fn next(
        &self,
        config: ProxyConfig,
        connector: Option<Arc<rustls::ClientConfig>>,
    ) -> Context {
        let mut next = Context::new(
            config,
            self.gateways.clone(),
            (self.device_tls.clone(), connector),
            self.hard_stop.clone(),
            self.deadlines.clone(),
        );
        self.pacer.set_rate(next.config.migration.move_rate);
        next.pacer = self.pacer.clone();
        next.links = self.links.clone();
        next.handover = self.handover.clone();
        next.seats = self.seats.clone();
        next
    }
}

/// Sessions by the ALPN protocol the device offered: a closed label set (the protocols the
/// routes name, `wasmbed/1`, `none`, `other`), each counter registered once.
pub struct AlpnCounts {
    known: Vec<(Vec<u8>, metrics::Counter)>,
    none: metrics::Counter,
    other: metrics::Counter,
}

/// The ALPN protocol of the device session protocol.
pub const WASMBED_ALPN: &str = "wasmbed/1";

impl AlpnCounts {
    fn new(routes: &[RouteConfig]) -> AlpnCounts {
        let mut names: Vec<&str> = vec![WASMBED_ALPN];
        for r in routes {
            if let Some(a) = r.alpn.as_deref()
                && !names.contains(&a)
            {
                names.push(a);
            }
        }
        let counter = |label: String| counter!(SESSIONS_BY_ALPN, "alpn" => label);
        AlpnCounts {
            known: names
                .into_iter()
                .map(|n| (n.as_bytes().to_vec(), counter(n.to_string())))
                .collect(),
            none: counter("none".into()),
            other: counter("other".into()),
        }
    }

    /// Counts one session by the first offered protocol that has a label of its own.
    pub(crate) fn count(&self, offered: &crate::clienthello::Alpn) {
        if offered.is_empty() {
            return self.none.increment(1);
        }
        let known = offered
            .iter()
            .find_map(|p| self.known.iter().find(|(name, _)| name == p));
        match known {
            Some((_, c)) => c.increment(1),
            None => self.other.increment(1),
        }
    }
}

/// Spaces moves at `--move-rate`: each takes the next free slot.
pub struct Pacer {
    /// The next free slot, and the gap between two slots.
    state: Mutex<(Instant, Duration)>,
}

impl Pacer {
    pub fn new(per_second: u32) -> Pacer {
        Pacer {
            state: Mutex::new((Instant::now(), Self::gap(per_second))),
        }
    }

    fn gap(per_second: u32) -> Duration {
        Duration::from_secs(1) / per_second.max(1)
    }

    /// Changes the rate (a config reload); slots already handed out stay.
    pub fn set_rate(&self, per_second: u32) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 = Self::gap(per_second);
    }

    /// No move is ordered any more (the last withdrawn: an undrain): the slots handed out
    /// are free again, and the next move may start now rather than after them.
    pub fn release_all(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 = state.0.min(Instant::now());
    }

    /// The instant this move may start.
    pub fn slot(&self) -> Instant {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let slot = state.0.max(Instant::now());
        state.0 = slot + state.1;
        slot
    }
}

/// The pools a session goes to, in order; shared by every session of one route (a session
/// keeps them for its moves: one pointer instead of a list of its own).
pub type Pools = std::sync::Arc<[String]>;

/// Each route's pools, then the default route's ([`Context::route_pools`]).
pub(crate) fn route_pools(routes: &[RouteConfig]) -> Vec<Pools> {
    routes
        .iter()
        .map(Some)
        .chain([None])
        .map(pools_of)
        .collect()
}

/// A route's pool, its fallbacks, then the default pool, each once; the default pool alone
/// for no route.
pub(crate) fn pools_of(route: Option<&RouteConfig>) -> Pools {
    let mut pools: Vec<String> = Vec::new();
    if let Some(r) = route {
        pools.push(r.pool.clone());
        pools.extend(r.fallback.iter().cloned());
    }
    pools.push(wasmbed_config::proxy::DEFAULT_POOL.to_string());
    let mut seen = std::collections::HashSet::new();
    pools.retain(|p| seen.insert(p.clone()));
    pools.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Turns handed out and given back (every move withdrawn) are free again: the next move
    /// starts now, not after them.
    #[test]
    fn released_turns_go_to_the_next_move() {
        let pacer = Pacer::new(1);
        let first = pacer.slot();
        let third = [pacer.slot(), pacer.slot()][1];
        assert!(third >= first + Duration::from_secs(2));
        pacer.release_all();
        assert!(pacer.slot() <= Instant::now(), "the next turn is now");
        assert!(pacer.slot() >= Instant::now() + Duration::from_millis(900));
    }
}
