//! rebalance: with `--rebalance on` (terminate mode), live sessions move from the fullest
//! gateways of a pool to the emptiest when the spread (max − min of sessions per unit of
//! weight) passes `--rebalance-threshold`, until it is within one.
//!
//! Long-lived device sessions never end on their own, so a gateway that joins or recovers
//! would otherwise get only new devices. Every tick the rebalancer looks at each pool's
//! eligible gateways (up, not draining); when the spread is over the threshold it orders each
//! gateway above its fair share to give up the excess ([`crate::balancer::Gateway::order_moves`]). The
//! sessions take the orders one by one, paced by `--move-rate`, and the balancer sends each to
//! the least loaded other gateway. Orders that nobody takes (every session there moved within
//! `--rebalance-cooldown`) are withdrawn after a while, so the rebalancer never waits forever.

#![expect(
    clippy::disallowed_methods,
    reason = "terminate mode only, whose data plane keeps its time driver (`data_plane_timers`)"
)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wasmbed_config::proxy::MigrationConfig;

use crate::balancer::Gateway;

const TICK: Duration = Duration::from_millis(200);
/// An order not taken within this time is withdrawn.
const ORDER_LIFETIME: Duration = Duration::from_secs(5);

/// How many sessions each gateway should give up, given `(sessions, weight)` per gateway;
/// `None` when the spread does not call for moves. `active`: an episode is under way (it
/// goes on until the spread is within one, even below the threshold).
pub fn plan(loads: &[(u64, u32)], threshold: u32, active: bool) -> Option<Vec<u64>> {
    if loads.len() < 2 {
        return None;
    }
    let per_weight = |&(s, w): &(u64, u32)| s as f64 / f64::from(w.max(1));
    let max = loads.iter().map(per_weight).fold(f64::MIN, f64::max);
    let min = loads.iter().map(per_weight).fold(f64::MAX, f64::min);
    let spread = max - min;
    let limit = if active { 1.0 } else { f64::from(threshold) };
    if spread <= limit {
        return None;
    }
    let total: u64 = loads.iter().map(|l| l.0).sum();
    let weights: u64 = loads.iter().map(|l| u64::from(l.1.max(1))).sum();
    let excess: Vec<u64> = loads
        .iter()
        .map(|&(s, w)| {
            let fair = (total * u64::from(w.max(1))).div_ceil(weights);
            s.saturating_sub(fair)
        })
        .collect();
    excess.iter().any(|&e| e > 0).then_some(excess)
}

/// Runs until `stop`; does nothing while `rebalance` is off (a reload may turn it on).
pub async fn run(live: Arc<crate::live::Live>, stop: CancellationToken) {
    let mut active: HashMap<String, bool> = HashMap::new();
    let mut ordered: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ctx = live.context();
        let config: &MigrationConfig = &ctx.config.migration;
        if !config.rebalance {
            active.clear();
            continue;
        }
        // Moves ordered earlier and not landed yet (waiting for their paced turn, or on the
        // way) are not in the counts: planning now would order them a second time (an
        // overshoot, then moves back). So plan only once they have all landed.
        if ctx.gateways.moves_in_flight() > 0 {
            continue;
        }
        let snapshot = ctx.gateways.snapshot();
        let mut pools: HashMap<&str, Vec<&Arc<Gateway>>> = HashMap::new();
        for g in snapshot.iter() {
            if g.is_healthy() && !g.is_draining() {
                pools.entry(g.pool.as_str()).or_default().push(g);
            }
        }
        for (pool, members) in pools {
            // Moves under way: wait for them, withdrawing orders nobody takes.
            let mut waiting = false;
            for g in &members {
                if g.moving() > 0 {
                    let stale = ordered
                        .get(&g.name)
                        .is_none_or(|t| t.elapsed() > ORDER_LIFETIME);
                    if stale {
                        g.order_moves(0);
                    } else {
                        waiting = true;
                    }
                }
            }
            if waiting {
                continue;
            }
            let loads: Vec<(u64, u32)> =
                members.iter().map(|g| (g.sessions(), g.weight())).collect();
            let was_active = active.get(pool).copied().unwrap_or(false);
            match plan(&loads, config.rebalance_threshold, was_active) {
                None => {
                    if was_active {
                        tracing::info!(pool, "rebalanced: the spread is within one");
                    }
                    active.insert(pool.to_string(), false);
                }
                Some(excess) => {
                    if !was_active {
                        tracing::info!(pool, ?loads, "rebalancing: moving sessions");
                    }
                    active.insert(pool.to_string(), true);
                    for (g, n) in members.iter().zip(excess) {
                        if n > 0 {
                            g.order_moves(n as usize);
                            ordered.insert(g.name.clone(), Instant::now());
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::plan;

    #[test]
    fn a_new_gateway_gets_its_share_from_the_others() {
        let loads = [(450, 1), (450, 1), (450, 1), (450, 1), (0, 1)];
        assert_eq!(plan(&loads, 2, false), Some(vec![90, 90, 90, 90, 0]));
    }

    #[test]
    fn a_spread_within_the_threshold_is_left_alone_until_an_episode_runs() {
        let loads = [(11, 1), (9, 1)];
        assert_eq!(plan(&loads, 2, false), None);
        assert_eq!(plan(&loads, 2, true), Some(vec![1, 0]));
        assert_eq!(plan(&[(10, 1), (9, 1)], 2, true), None);
    }

    #[test]
    fn weights_set_the_fair_share() {
        // 40 sessions, weights 1:3: fair shares 10 and 30.
        assert_eq!(plan(&[(20, 1), (20, 3)], 2, false), Some(vec![10, 0]));
        assert_eq!(plan(&[(10, 1), (30, 3)], 2, false), None);
    }

    #[test]
    fn one_gateway_is_never_rebalanced() {
        assert_eq!(plan(&[(100, 1)], 2, false), None);
    }
}
