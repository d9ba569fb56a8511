//! discovery: gateways found in DNS (`--gateway-dns NAME:PORT`, A/AAAA records such as a
//! headless Service's; `--gateway-srv NAME`, SRV records), with `hickory-resolver`.
//!
//! One task per source re-resolves it at the answer's TTL, clamped to 1 s..30 s. A new address
//! joins the set unproven: it takes sessions once its first probe passes, in slow start. An
//! address gone from the answer takes no new sessions at once; once it is missing from two
//! answers in a row its sessions are asked to move (terminate mode), and it leaves the set when
//! it has no session left or after `--dns-grace`. An address that comes back before then is
//! taken back as it was: a record that flaps costs no session. An error, NXDOMAIN, a timeout
//! or an empty answer keeps the last good set (logged, counted): an empty answer in the middle
//! of a rollout must not black-hole every device. An answer is capped at `--max-discovered`
//! addresses (the lowest ones, so the same subset stays chosen; counted).

#![expect(
    clippy::disallowed_methods,
    reason = "discovery runs on the probes' thread (`Proxy::run`)"
)]

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use metrics::{counter, gauge};
use tokio_util::sync::CancellationToken;
use wasmbed_config::defaults::proxy::{DNS_REFRESH_MAX, DNS_REFRESH_MIN};
use wasmbed_config::proxy::{DiscoveryConfig, DiscoveryTarget, DnsQuery};
use wasmbed_config::{GatewayConfig, HealthCheck, Mode};

use crate::balancer::{Gateway, Origin};
use crate::live::Live;
use crate::metric_names::{DISCOVERED, DISCOVERY_CAPPED, DISCOVERY_CHANGES, DISCOVERY_ERRORS};

/// Why an answer was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unused {
    NxDomain,
    Empty,
    Timeout,
    Error,
}

impl Unused {
    pub fn as_str(self) -> &'static str {
        match self {
            Unused::NxDomain => "nxdomain",
            Unused::Empty => "empty",
            Unused::Timeout => "timeout",
            Unused::Error => "error",
        }
    }

    fn of(e: &NetError) -> Unused {
        if e.is_nx_domain() {
            Unused::NxDomain
        } else if e.is_no_records_found() {
            Unused::Empty
        } else if matches!(e, NetError::Timeout) {
            Unused::Timeout
        } else {
            Unused::Error
        }
    }
}

/// Builds the resolver discovery uses: the given servers (UDP, then TCP for a truncated
/// answer), or the system's configuration when none is given.
pub fn resolver(config: &DiscoveryConfig) -> Result<TokioResolver, NetError> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if config.servers.is_empty() {
        TokioResolver::builder(provider)?
    } else {
        let servers = config
            .servers
            .iter()
            .map(|s| {
                let mut udp = ConnectionConfig::udp();
                udp.port = s.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = s.port();
                NameServerConfig::new(s.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], servers),
            provider,
        )
    };
    let options = builder.options_mut();
    options.timeout = config.timeout;
    options.attempts = 1;
    // The answers are re-asked at their TTL anyway; a negative answer is not kept long, so
    // that a name that comes back is seen at the next query.
    options.positive_max_ttl = Some(DNS_REFRESH_MAX);
    options.negative_max_ttl = Some(DNS_REFRESH_MIN);
    builder.build()
}

/// One answer: the addresses (sorted, capped) and when to ask again.
#[derive(Debug)]
pub struct Answer {
    pub addrs: Vec<SocketAddr>,
    pub ttl: Duration,
    /// Addresses beyond the cap, ignored.
    pub capped: usize,
}

/// Resolves one source.
pub async fn resolve(
    resolver: &TokioResolver,
    query: &DnsQuery,
    max: usize,
) -> Result<Answer, Unused> {
    let mut addrs = BTreeSet::new();
    let mut ttl = u32::MAX;
    match query {
        DnsQuery::Addresses { name, port } => {
            let found = resolver
                .lookup_ip(name.as_str())
                .await
                .map_err(|e| Unused::of(&e))?;
            for r in found.as_lookup().answers() {
                if let Some(ip) = ip_of(&r.data) {
                    ttl = ttl.min(r.ttl);
                    addrs.insert(SocketAddr::new(ip, *port));
                }
            }
        }
        DnsQuery::Srv { name } => {
            let found = resolver
                .srv_lookup(name.as_str())
                .await
                .map_err(|e| Unused::of(&e))?;
            let records: Vec<(String, u16, u32)> = found
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(srv) => Some((srv.target.to_ascii(), srv.port, r.ttl)),
                    _ => None,
                })
                .collect();
            for (target, port, record_ttl) in records.into_iter().take(max) {
                ttl = ttl.min(record_ttl);
                // One target failing does not spoil the others.
                let Ok(ips) = resolver.lookup_ip(target.as_str()).await else {
                    continue;
                };
                for r in ips.as_lookup().answers() {
                    if let Some(ip) = ip_of(&r.data) {
                        ttl = ttl.min(r.ttl);
                        addrs.insert(SocketAddr::new(ip, port));
                    }
                }
            }
        }
    }
    if addrs.is_empty() {
        return Err(Unused::Empty);
    }
    let capped = addrs.len().saturating_sub(max);
    Ok(Answer {
        addrs: addrs.into_iter().take(max).collect(),
        ttl: clamp_ttl(ttl),
        capped,
    })
}

/// The address of an A or AAAA record.
fn ip_of(data: &RData) -> Option<IpAddr> {
    match data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

fn clamp_ttl(seconds: u32) -> Duration {
    Duration::from_secs(u64::from(seconds)).clamp(DNS_REFRESH_MIN, DNS_REFRESH_MAX)
}

/// Runs until `stop`: one task per source of the running config, restarted when a reload
/// changes the sources or the discovery settings.
pub async fn run(live: Arc<Live>, stop: CancellationToken) {
    let mut generation = live.generation.subscribe();
    let mut running: HashMap<String, (DiscoveryTarget, CancellationToken)> = HashMap::new();
    let mut settings: Option<DiscoveryConfig> = None;
    loop {
        let ctx = live.context();
        let config = &ctx.config.discovery;
        let common_changed = settings.as_ref().is_some_and(|s| {
            (&s.servers, s.timeout, s.grace, s.max_addresses)
                != (
                    &config.servers,
                    config.timeout,
                    config.grace,
                    config.max_addresses,
                )
        });
        // Sources gone from the config: their gateways leave (drained, sessions moved).
        running.retain(|label, (target, token)| {
            let kept = !common_changed && config.targets.contains(target);
            if !kept {
                token.cancel();
                if !config.targets.iter().any(|t| &t.label() == label) {
                    for g in ctx.gateways.snapshot().iter() {
                        if g.origin == Origin::Dns(label.clone()) {
                            crate::live::remove(&ctx.gateways, &g.name);
                        }
                    }
                    tracing::info!(source = %label, "discovery source removed");
                }
            }
            kept
        });
        settings = Some(config.clone());
        if !config.targets.is_empty() {
            match resolver(config) {
                Ok(resolver) => {
                    for target in &config.targets {
                        let label = target.label();
                        if running.contains_key(&label) {
                            continue;
                        }
                        let token = stop.child_token();
                        tokio::spawn(watch(
                            live.clone(),
                            resolver.clone(),
                            target.clone(),
                            config.clone(),
                            token.clone(),
                        ));
                        running.insert(label, (target.clone(), token));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "DNS discovery cannot start: no resolver");
                    counter!(DISCOVERY_ERRORS, "source" => "*", "reason" => "error").increment(1);
                }
            }
        }
        drop(ctx);
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = generation.changed() => if changed.is_err() { return },
        }
    }
}

/// What one source knows of an address it found.
struct Known {
    gateway: Arc<Gateway>,
    /// When it went missing from the answers (`None`: in the last one).
    gone_since: Option<Instant>,
    /// Answers in a row without it.
    missing: u32,
}

/// One source's loop.
async fn watch(
    live: Arc<Live>,
    resolver: TokioResolver,
    target: DiscoveryTarget,
    config: DiscoveryConfig,
    stop: CancellationToken,
) {
    let label = target.label();
    let origin = Origin::Dns(label.clone());
    // Gateways this source added before a restart (a reload) are its own again: kept where
    // they still fit its settings (the weight is changed in place), replaced where the pool or
    // health port changed (removed now, found again in the next answer).
    let mut known: HashMap<SocketAddr, Known> = HashMap::new();
    let ctx = live.context();
    for g in ctx
        .gateways
        .snapshot()
        .iter()
        .filter(|g| g.origin == origin)
    {
        let Ok(addr) = g.addr.parse::<SocketAddr>() else {
            continue;
        };
        let health = target
            .health_port
            .map(|p| SocketAddr::new(addr.ip(), p).to_string());
        if g.pool != target.pool || g.health_addr != health {
            crate::live::remove(&ctx.gateways, &g.name);
            continue;
        }
        g.set_weight(target.weight);
        // One whose address had left the answers is known as gone since then (its drain is
        // undone if the address comes back, it is reaped as before, within its grace).
        let gone = g.gone_from_dns();
        known.insert(
            addr,
            Known {
                gateway: g.clone(),
                gone_since: gone,
                missing: u32::from(gone.is_some()),
            },
        );
    }
    drop(ctx);
    let mut failures: u32 = 0;
    let mut next_query = Instant::now();
    loop {
        if Instant::now() >= next_query {
            let deadline = config.timeout * 2 + Duration::from_secs(1);
            let answer = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(deadline, resolve(&resolver, &target.query, config.max_addresses)) => {
                    r.unwrap_or(Err(Unused::Timeout))
                }
            };
            let wait = match answer {
                Ok(answer) => {
                    failures = 0;
                    // Applied first: whoever sees the counters sees the set they describe.
                    apply(&live, &target, &origin, &answer.addrs, &mut known);
                    if answer.capped > 0 {
                        counter!(DISCOVERY_CAPPED, "source" => label.clone()).increment(1);
                        tracing::warn!(source = %label, ignored = answer.capped, max = config.max_addresses, "DNS answer capped");
                    }
                    gauge!(DISCOVERED, "source" => label.clone()).set(answer.addrs.len() as f64);
                    answer.ttl
                }
                Err(why) => {
                    failures = failures.saturating_add(1);
                    counter!(DISCOVERY_ERRORS, "source" => label.clone(), "reason" => why.as_str())
                        .increment(1);
                    tracing::warn!(source = %label, reason = why.as_str(), kept = known.len(), "DNS answer not used; the last good set stays");
                    // 1 s, 2 s, 4 s ... up to the longest refresh.
                    (DNS_REFRESH_MIN * 2u32.saturating_pow(failures.saturating_sub(1).min(5)))
                        .min(DNS_REFRESH_MAX)
                }
            };
            next_query = Instant::now() + wait;
        }
        reap(&live, &label, &config, &mut known);
        // Gone addresses are looked at every second until they leave.
        let wake = if known.values().any(|k| k.gone_since.is_some()) {
            next_query.min(Instant::now() + Duration::from_secs(1))
        } else {
            next_query
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// Brings the set in line with one good answer.
fn apply(
    live: &Live,
    target: &DiscoveryTarget,
    origin: &Origin,
    addrs: &[SocketAddr],
    known: &mut HashMap<SocketAddr, Known>,
) {
    let ctx = live.context();
    let label = target.label();
    let change = |what: &'static str| {
        counter!(DISCOVERY_CHANGES, "source" => label.clone(), "change" => what).increment(1);
    };
    let terminate = ctx.config.mode == Mode::Terminate;
    for addr in addrs {
        if let Some(k) = known.get_mut(addr) {
            k.missing = 0;
            if k.gone_since.take().is_some() {
                k.gateway.set_gone_from_dns(None);
                k.gateway.set_draining(false);
                k.gateway.order_moves(0);
                change("returned");
                tracing::info!(source = %label, gateway = %k.gateway.name, "address is back in DNS");
            }
            continue;
        }
        let name = format!("{label}/{addr}");
        // Removed by an operator (`DELETE`): kept out, as a reload keeps it out.
        if live.removed_at_run_time(&name) {
            continue;
        }
        let config = GatewayConfig {
            name,
            addr: addr.to_string(),
            health_addr: target
                .health_port
                .map(|p| SocketAddr::new(addr.ip(), p).to_string()),
            weight: target.weight,
            pool: target.pool.clone(),
        };
        let probed = ctx.config.health.check != HealthCheck::None;
        if let Some(g) = ctx.gateways.add_from(&config, origin.clone(), probed) {
            live.probes
                .start(std::slice::from_ref(&g), &ctx.config.health);
            change("added");
            tracing::info!(source = %label, gateway = %g.name, "address found in DNS: probing");
            crate::events::event("added", Some(&g.name), format!("{} found in DNS", g.name));
            known.insert(
                *addr,
                Known {
                    gateway: g,
                    gone_since: None,
                    missing: 0,
                },
            );
        }
    }
    for (addr, k) in known.iter_mut() {
        if addrs.contains(addr) {
            continue;
        }
        k.missing = k.missing.saturating_add(1);
        if k.gone_since.is_none() {
            let now = Instant::now();
            k.gone_since = Some(now);
            k.gateway.set_gone_from_dns(Some(now));
            k.gateway.set_draining(true);
            change("gone");
            tracing::info!(source = %label, gateway = %k.gateway.name, sessions = k.gateway.sessions(), "address gone from DNS: draining");
            crate::events::event(
                "drain",
                Some(&k.gateway.name),
                format!("{} gone from DNS: draining", k.gateway.name),
            );
        }
        // Missing twice in a row is not a flap: its sessions move (terminate mode).
        if k.missing == 2 && terminate {
            k.gateway.order_moves(usize::MAX);
        }
    }
}

/// Removes gone addresses that have no session left, or whose grace is over.
fn reap(
    live: &Live,
    label: &str,
    config: &DiscoveryConfig,
    known: &mut HashMap<SocketAddr, Known>,
) {
    let ctx = live.context();
    known.retain(|_, k| {
        let Some(since) = k.gone_since else {
            return true;
        };
        // Empty and missing twice in a row (not a flap), or the grace is over.
        let done = (k.missing >= 2 && k.gateway.sessions() == 0) || since.elapsed() >= config.grace;
        if done {
            crate::live::remove(&ctx.gateways, &k.gateway.name);
            counter!(DISCOVERY_CHANGES, "source" => label.to_string(), "change" => "removed")
                .increment(1);
        }
        !done
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_clamped_to_one_to_thirty_seconds() {
        assert_eq!(clamp_ttl(0), Duration::from_secs(1));
        assert_eq!(clamp_ttl(5), Duration::from_secs(5));
        assert_eq!(clamp_ttl(86_400), Duration::from_secs(30));
    }
}
