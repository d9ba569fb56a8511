//! Validation of the proxy's raw config: each field checked, each problem naming its field.

use crate::defaults::proxy as defaults;
use std::collections::HashSet;
use std::time::Duration;

use super::*;
use crate::{check_endpoint, duration_or, parse_addr};

/// Parses `[NAME=]HOST:PORT[;weight=N][;health=HOST:PORT][;pool=P]`.
pub(super) fn parse_gateway_flag(spec: &str) -> Result<RawGateway, ConfigError> {
    let field = format!("--gateway {spec}");
    let mut parts = spec.split(';');
    let head = parts.next().unwrap_or_default().trim();
    let (name, addr) = match head.split_once('=') {
        Some((n, a)) => (Some(n.trim().to_string()), a.trim().to_string()),
        None => (None, head.to_string()),
    };
    let mut g = RawGateway {
        name,
        addr,
        health_addr: None,
        weight: None,
        pool: None,
    };
    for part in parts {
        match part.trim().split_once('=') {
            Some(("weight", w)) => {
                g.weight = Some(w.parse().map_err(|_| {
                    ConfigError::field(&field, format!("weight {w:?} is not a whole number"))
                })?)
            }
            Some(("health", h)) => g.health_addr = Some(h.to_string()),
            Some(("pool", p)) => g.pool = Some(p.to_string()),
            _ => {
                return Err(ConfigError::field(
                    &field,
                    format!("unknown option {part:?} (expected weight=, health= or pool=)"),
                ));
            }
        }
    }
    Ok(g)
}

pub(super) fn listeners(raw: &RawProxy) -> Result<Vec<ListenerConfig>, ConfigError> {
    let mode = raw.mode.unwrap_or_default();
    let upstream = raw.upstream.unwrap_or_default();
    let defaults = [RawListener::at(DEFAULT_LISTEN.to_string())];
    let list = if raw.listener.is_empty() {
        &defaults[..]
    } else {
        &raw.listener[..]
    };
    let mut seen = HashSet::new();
    list.iter()
        .enumerate()
        .map(|(i, l)| {
            let field = format!("listener[{i}].addr");
            let addr = parse_addr(&field, &l.addr)?;
            if !seen.insert(addr) {
                return Err(ConfigError::field(field, format!("{addr} is listed twice")));
            }
            if l.raw && mode != Mode::Terminate {
                return Err(ConfigError::field(
                    format!("listener[{i}].raw"),
                    "needs terminate mode (in passthrough the bytes are forwarded as they are)",
                ));
            }
            if l.raw && upstream == UpstreamMode::Link {
                return Err(ConfigError::field(
                    format!("listener[{i}].raw"),
                    "needs --upstream tcp: a link's streams carry device sessions",
                ));
            }
            Ok(ListenerConfig {
                addr,
                allow_plain: l.allow_plain,
                raw: l.raw,
                reuse_port: l.reuse_port,
                defer_accept: defer_accept(i, l.defer_accept.as_deref())?,
                backlog: l.backlog.unwrap_or(defaults::BACKLOG),
            })
        })
        .collect()
}

pub(super) fn gateways(
    raw: &[RawGateway],
    may_be_empty: bool,
) -> Result<Vec<GatewayConfig>, ConfigError> {
    if raw.is_empty() && !may_be_empty {
        return Err(ConfigError::field(
            "gateway",
            "at least one gateway is needed (--gateway HOST:PORT or [[gateway]], or discovery: \
             --gateway-dns / --gateway-srv; --allow-empty accepts none)",
        ));
    }
    let mut names = HashSet::new();
    raw.iter()
        .enumerate()
        .map(|(i, g)| {
            let field = format!("gateway[{i}]");
            let config = gateway(&field, g)?;
            if !names.insert(config.name.clone()) {
                return Err(ConfigError::field(
                    format!("{field}.name"),
                    format!("{:?} is used twice", config.name),
                ));
            }
            Ok(config)
        })
        .collect()
}

/// One gateway, validated the same way from the config file, a flag, or `POST
/// /api/gateways`; `field` names it in errors (`gateway[2]`, or `gateway` for the API).
pub fn gateway(field: &str, g: &GatewaySpec) -> Result<GatewayConfig, ConfigError> {
    let addr = check_endpoint(&format!("{field}.addr"), &g.addr)?;
    let name = g.name.clone().unwrap_or_else(|| addr.clone());
    let valid_name = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:[]".contains(c));
    if !valid_name {
        return Err(ConfigError::field(
            format!("{field}.name"),
            format!("{name:?}: 1 to 64 of letters, digits, '-', '_', '.', ':'"),
        ));
    }
    let health_addr = g
        .health_addr
        .as_deref()
        .map(|h| check_endpoint(&format!("{field}.health_addr"), h))
        .transpose()?;
    let weight = g.weight.unwrap_or(defaults::WEIGHT);
    if !(1..=1000).contains(&weight) {
        return Err(ConfigError::field(
            format!("{field}.weight"),
            "must be between 1 and 1000",
        ));
    }
    let pool = g.pool.clone().unwrap_or_else(|| DEFAULT_POOL.to_string());
    if pool.is_empty() || pool.len() > 64 {
        return Err(ConfigError::field(
            format!("{field}.pool"),
            "must be 1 to 64 characters",
        ));
    }
    Ok(GatewayConfig {
        name,
        addr,
        health_addr,
        weight,
        pool,
    })
}

/// `check = "http"` probes a gateway's admin endpoint: a gateway without one cannot be
/// probed that way (its device port does not speak HTTP).
pub fn health_target(
    field: &str,
    check: HealthCheck,
    g: &GatewayConfig,
) -> Result<(), ConfigError> {
    if check == HealthCheck::Http && g.health_addr.is_none() {
        return Err(ConfigError::field(
            format!("{field}.health_addr"),
            format!(
                "gateway {:?} has none, but health checks are `http` (give it one, or use `auto`: \
                 http where there is a health address, tcp elsewhere)",
                g.name
            ),
        ));
    }
    Ok(())
}

/// `pools`: the pools of the listed gateways and of the discovery targets.
pub(super) fn routes(raw: &[RawRoute], pools: &[&str]) -> Result<Vec<RouteConfig>, ConfigError> {
    raw.iter()
        .enumerate()
        .map(|(i, r)| {
            if !pools.contains(&r.pool.as_str()) {
                return Err(ConfigError::field(
                    format!("route[{i}].pool"),
                    format!("no gateway is in pool {:?}", r.pool),
                ));
            }
            let sni = r.sni.as_deref().map(|s| s.trim().to_ascii_lowercase());
            if let Some(sni) = &sni
                && (sni.is_empty() || sni[sni.starts_with("*.") as usize * 2..].contains('*'))
            {
                return Err(ConfigError::field(
                    format!("route[{i}].sni"),
                    "expected a host name or *.suffix",
                ));
            }
            let alpn = r.alpn.clone();
            if let Some(a) = &alpn
                && (a.is_empty() || a.len() > 255 || !a.is_ascii())
            {
                return Err(ConfigError::field(
                    format!("route[{i}].alpn"),
                    "expected a protocol name of 1 to 255 ASCII characters",
                ));
            }
            for (key, value) in [("cert_uri", &r.cert_uri), ("cert_ou", &r.cert_ou)] {
                if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                    return Err(ConfigError::field(format!("route[{i}].{key}"), "is empty"));
                }
            }
            if sni.is_none() && alpn.is_none() && r.cert_uri.is_none() && r.cert_ou.is_none() {
                return Err(ConfigError::field(
                    format!("route[{i}]"),
                    "needs `sni`, `alpn`, `cert_uri` or `cert_ou` (one or more)",
                ));
            }
            for (j, pool) in r.fallback.iter().enumerate() {
                if !pools.contains(&pool.as_str()) {
                    return Err(ConfigError::field(
                        format!("route[{i}].fallback[{j}]"),
                        format!("no gateway is in pool {pool:?}"),
                    ));
                }
            }
            Ok(RouteConfig {
                sni,
                alpn,
                cert_uri: r.cert_uri.clone(),
                cert_ou: r.cert_ou.clone(),
                fallback: r.fallback.clone(),
                pool: r.pool.clone(),
            })
        })
        .collect()
}

pub(super) fn health(raw: &RawHealth) -> Result<HealthConfig, ConfigError> {
    let interval = duration_or(
        "health.interval",
        raw.interval.as_deref(),
        defaults::HEALTH_INTERVAL,
    )?;
    // Without an explicit timeout, a probe gets half the interval, at most 500ms.
    let timeout = duration_or(
        "health.timeout",
        raw.timeout.as_deref(),
        (interval / 2).min(defaults::HEALTH_TIMEOUT_MAX),
    )?;
    positive("health.interval", interval)?;
    positive("health.timeout", timeout)?;
    if timeout >= interval {
        return Err(ConfigError::field(
            "health.timeout",
            format!("{timeout:?} must be shorter than health.interval ({interval:?})"),
        ));
    }
    let rise = raw.rise.unwrap_or(defaults::RISE);
    let fall = raw.fall.unwrap_or(defaults::FALL);
    if rise == 0 {
        return Err(ConfigError::field("health.rise", "must be at least 1"));
    }
    if fall == 0 {
        return Err(ConfigError::field("health.fall", "must be at least 1"));
    }
    let path = raw
        .path
        .clone()
        .unwrap_or_else(|| defaults::HEALTH_PATH.to_string());
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace()) {
        return Err(ConfigError::field(
            "health.path",
            "must start with '/' and hold no spaces",
        ));
    }
    Ok(HealthConfig {
        check: raw.check.unwrap_or_default(),
        interval,
        timeout,
        rise,
        fall,
        path,
        watch: raw.watch.unwrap_or(true),
    })
}

/// `[[listener]] defer_accept`: at most a minute (the kernel's own schedule past that is
/// minutes); zero turns it off.
fn defer_accept(i: usize, text: Option<&str>) -> Result<Duration, ConfigError> {
    let field = format!("listener[{i}].defer_accept");
    let d = duration_or(&field, text, defaults::DEFER_ACCEPT)?;
    if d > Duration::from_secs(60) {
        return Err(ConfigError::field(field, "must be at most 1m"));
    }
    Ok(d)
}

pub(super) fn positive(field: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::field(field, "must be longer than zero"));
    }
    Ok(d)
}

/// Parses `NAME:PORT[;pool=P][;weight=N][;health-port=N]` (`--gateway-dns`) or
/// `NAME[;...]` (`--gateway-srv`).
pub(super) fn parse_discovery_flag(
    flag: &str,
    spec: &str,
    srv: bool,
) -> Result<RawDiscovery, ConfigError> {
    let field = format!("{flag} {spec}");
    let mut parts = spec.split(';');
    let head = parts.next().unwrap_or_default().trim().to_string();
    let mut d = RawDiscovery::default();
    if srv {
        d.srv = Some(head);
    } else {
        d.dns = Some(head);
    }
    for part in parts {
        let number = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| ConfigError::field(&field, format!("{v:?} is not a whole number")))
        };
        match part.trim().split_once('=') {
            Some(("pool", p)) => d.pool = Some(p.to_string()),
            Some(("weight", w)) => d.weight = Some(number(w)?),
            Some(("health-port" | "health_port", p)) => {
                d.health_port =
                    Some(u16::try_from(number(p)?).map_err(|_| {
                        ConfigError::field(&field, format!("port {p} is out of range"))
                    })?)
            }
            _ => {
                return Err(ConfigError::field(
                    &field,
                    format!("unknown option {part:?} (expected pool=, weight= or health-port=)"),
                ));
            }
        }
    }
    Ok(d)
}

/// A DNS name as a query may name it: labels of letters, digits, '-' and '_' (SRV names start
/// with `_service._proto`), an optional final dot.
fn dns_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let trimmed = name.trim().trim_end_matches('.');
    let ok = !trimmed.is_empty()
        && trimmed.len() <= 253
        && trimmed.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !ok {
        return Err(ConfigError::field(
            field,
            format!("{name:?} is not a DNS name"),
        ));
    }
    Ok(name.trim().to_ascii_lowercase())
}

pub(super) fn discovery(raw: &RawProxy) -> Result<DiscoveryConfig, ConfigError> {
    let mut targets = Vec::new();
    let mut seen = HashSet::new();
    for (i, d) in raw.discovery.iter().enumerate() {
        let field = format!("discovery[{i}]");
        let query = match (&d.dns, &d.srv) {
            (Some(dns), None) => {
                let bad = || {
                    ConfigError::field(
                        format!("{field}.dns"),
                        format!("{dns:?}: expected NAME:PORT, e.g. gateways.wasmbed.svc:9001"),
                    )
                };
                let (name, port) = dns.trim().rsplit_once(':').ok_or_else(bad)?;
                let port: u16 = port.parse().map_err(|_| bad())?;
                if port == 0 {
                    return Err(bad());
                }
                DnsQuery::Addresses {
                    name: dns_name(&format!("{field}.dns"), name)?,
                    port,
                }
            }
            (None, Some(srv)) => DnsQuery::Srv {
                name: dns_name(&format!("{field}.srv"), srv)?,
            },
            _ => {
                return Err(ConfigError::field(
                    field,
                    "needs exactly one of dns = \"NAME:PORT\" or srv = \"NAME\"",
                ));
            }
        };
        if !seen.insert(query.clone()) {
            return Err(ConfigError::field(field, "is listed twice"));
        }
        // The same checks as a listed gateway's pool and weight.
        let checked = gateway(
            &field,
            &GatewaySpec {
                name: Some("discovered".into()),
                addr: "127.0.0.1:1".into(),
                health_addr: None,
                weight: d.weight,
                pool: d.pool.clone(),
            },
        )?;
        if d.health_port == Some(0) {
            return Err(ConfigError::field(
                format!("{field}.health_port"),
                "must be a port (1 to 65535)",
            ));
        }
        targets.push(DiscoveryTarget {
            query,
            pool: checked.pool,
            weight: checked.weight,
            health_port: d.health_port,
        });
    }
    let servers = raw
        .dns_server
        .iter()
        .enumerate()
        .map(|(i, s)| parse_addr(&format!("dns_server[{i}]"), s))
        .collect::<Result<Vec<_>, _>>()?;
    let max_addresses = raw.max_discovered.unwrap_or(defaults::MAX_DISCOVERED);
    if max_addresses == 0 {
        return Err(ConfigError::field("max_discovered", "must be at least 1"));
    }
    Ok(DiscoveryConfig {
        targets,
        servers,
        timeout: positive(
            "dns_timeout",
            duration_or(
                "dns_timeout",
                raw.dns_timeout.as_deref(),
                defaults::DNS_TIMEOUT,
            )?,
        )?,
        grace: duration_or("dns_grace", raw.dns_grace.as_deref(), defaults::DNS_GRACE)?,
        max_addresses,
    })
}
