//! `wasmbed up --scenario soak --duration D`: the fleet at its steady rate for a long time,
//! with everything that happens to a deployment over hours: devices leaving and coming back
//! (churn), the last gateway killed and replaced at a new address every period (its sessions move;
//! the proxy's set changes at run time, as a rescheduled pod's would), a gateway the proxy finds
//! in DNS moved to a new address every period (the record changed on a DNS server of our own:
//! the proxy drains the old address with moves and drops it), a drain with moves, a
//! configuration reload after those run-time changes. Every process's RSS and descriptors,
//! the sessions, moves, answers and state resets are sampled as it runs; the report fails on
//! any loss, any app state restarted, or growth past a stated bound after the warm-up.

use std::sync::atomic::Ordering::Relaxed;

use serde::Serialize;

use super::scenarios::{
    Killed, Moves, conclude, gateways_seen, proxy_sessions, settle, signal_pid,
};
use super::*;

/// What the soak needs to start replacement gateways.
pub(super) struct Soak {
    pub(super) duration: Duration,
    /// `--period`, if given.
    pub(super) period: Option<Duration>,
    pub(super) dir: PathBuf,
    /// How the replacements run.
    pub(super) gateway: GatewayRun,
    /// The gateway the proxy finds in DNS, moved to a new address every period.
    pub(super) dns: Option<DnsGateway>,
}

/// The discovered gateway: the DNS server publishing it, and the gateway now.
pub(super) struct DnsGateway {
    pub(super) server: wasmbed_devdns::DnsServer,
    pub(super) gw: Discovered,
}

/// The proxy's entry for the gateway at device address `addr`, if it lists one.
fn at_address(admin: SocketAddr, addr: &str) -> Option<serde_json::Value> {
    gateways_seen(admin)?
        .into_iter()
        .find(|g| g["address"].as_str() == Some(addr))
}

/// Moves the discovered gateway as a rescheduled pod moves: a new process on the next
/// address (same ports), the name's record changed to it alone. The proxy must find the new
/// one in DNS and have it healthy, and move the old one's sessions off and drop it from its
/// set (the address gone from two answers in a row); then the old process ends. True when all
/// of that happened in time.
async fn dns_move(soak: &Soak, admin: SocketAddr, d: &mut DnsGateway) -> bool {
    let [a, b, c, last] = d.gw.ip.octets();
    let Some(next) = last.checked_add(1).filter(|n| *n < 255) else {
        esay!("wasmbed up: soak: no loopback address left for the discovered gateway");
        return false;
    };
    let ip = std::net::Ipv4Addr::new(a, b, c, next);
    let at = GatewayAt {
        name: format!("gw-dns-{next}"),
        certificate: d.gw.certificate,
        listen: format!("{ip}:{}", d.gw.port),
        admin: format!("{ip}:{}", d.gw.health_port),
    };
    let child = match spawn_gateway_at(&soak.gateway, &soak.dir, at) {
        Ok((_, child, _, _)) => child,
        Err(e) => {
            esay!("wasmbed up: soak: cannot start the discovered gateway on {ip}: {e}");
            return false;
        }
    };
    let old = d.gw.listen();
    let old_child = std::mem::replace(&mut d.gw.child, Killed(child));
    d.gw.ip = ip;
    d.server.set_a(DISCOVERED_NAME, &[ip], 1).await;
    let new = d.gw.listen();
    let found = until(Duration::from_secs(20), || {
        at_address(admin, &new).is_some_and(|g| g["healthy"] == true)
    })
    .await;
    let left = until(Duration::from_secs(60), || {
        gateways_seen(admin).is_some() && at_address(admin, &old).is_none()
    })
    .await;
    // Its sessions moved (it left the set with none): now the pod ends.
    drop(old_child);
    found && left
}

/// One process's footprint.
#[derive(Debug, Clone, Copy, Serialize)]
struct Usage {
    rss_kib: u64,
    fds: u64,
}

/// RSS (`VmRSS`) and open descriptors of `pid`, from `/proc`.
fn usage(pid: u32) -> Option<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Usage { rss_kib, fds })
}

/// One sample of the whole system.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    t_s: f64,
    /// By role: `proxy`, `gw-N` (whichever process is that gateway now), `fleet` (this
    /// process: the simulated devices and the scenario).
    processes: BTreeMap<String, Usage>,
    /// Devices on a session now (the fleet's count) and the sessions the proxy holds.
    devices_connected: usize,
    proxy_sessions: Option<usize>,
    moves: f64,
    sent: u64,
    answered: u64,
    state_resets: u64,
    churned: u64,
}

/// The growth bound after warm-up: the median of the last third of the samples may exceed
/// the first third's by at most 10% plus this much (RSS in KiB, descriptors).
const RSS_SLACK_KIB: u64 = 8 * 1024;
const FDS_SLACK: u64 = 16;

/// One process role's footprint, early and late after the warm-up.
#[derive(Debug, Clone, Serialize, PartialEq)]
struct Growth {
    process: String,
    rss_first_kib: u64,
    rss_last_kib: u64,
    fds_first: u64,
    fds_last: u64,
    within_bound: bool,
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Per role, the medians of the first and last thirds of the samples taken after
/// `warm_up_s`, and whether the growth between them stays within the bound. Too few samples
/// (under 6 after the warm-up) give no verdict: an empty list. `skip`: roles whose process
/// is replaced during the run (its new process warms up again: no steady state to compare).
fn growth(samples: &[Sample], warm_up_s: f64, skip: &[&str]) -> Vec<Growth> {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= warm_up_s).collect();
    if after.len() < 6 {
        return Vec::new();
    }
    let third = after.len() / 3;
    let (first, last) = (&after[..third], &after[after.len() - third..]);
    let roles: std::collections::BTreeSet<&String> = after
        .iter()
        .flat_map(|s| s.processes.keys())
        .filter(|r| !skip.contains(&r.as_str()))
        .collect();
    let pick = |window: &[&Sample], role: &str, f: fn(&Usage) -> u64| {
        median(
            window
                .iter()
                .filter_map(|s| s.processes.get(role).map(f))
                .collect(),
        )
    };
    let allowed = |first: u64, slack: u64| first + first / 10 + slack;
    roles
        .into_iter()
        .map(|role| {
            let (rf, rl) = (
                pick(first, role, |u| u.rss_kib),
                pick(last, role, |u| u.rss_kib),
            );
            let (ff, fl) = (pick(first, role, |u| u.fds), pick(last, role, |u| u.fds));
            Growth {
                process: role.clone(),
                rss_first_kib: rf,
                rss_last_kib: rl,
                fds_first: ff,
                fds_last: fl,
                within_bound: rl <= allowed(rf, RSS_SLACK_KIB) && fl <= allowed(ff, FDS_SLACK),
            }
        })
        .collect()
}

/// A gateway as the soak knows it: its current process.
struct Gw {
    name: String,
    index: usize,
    pid: u32,
    /// Its device address now (changed by a replacement), as the proxy must list it.
    listen: Option<SocketAddr>,
    /// A replacement started by the soak (the first ones belong to the stack).
    child: Option<Killed>,
}

/// Whether the proxy has `name` in its set and healthy; `None` when not listed or unreadable.
fn healthy(admin: SocketAddr, name: &str) -> Option<bool> {
    gateways_seen(admin)?
        .iter()
        .find(|g| g["name"].as_str() == Some(name))
        .and_then(|g| g["healthy"].as_bool())
}

/// The proxy's gateway set: names and addresses, sorted.
fn names(admin: SocketAddr) -> Option<Vec<(String, String)>> {
    let mut n: Vec<(String, String)> = gateways_seen(admin)?
        .iter()
        .filter_map(|g| Some((g["name"].as_str()?.into(), g["address"].as_str()?.into())))
        .collect();
    n.sort();
    Some(n)
}

/// What happened at one event, for the report.
#[derive(Debug, Serialize)]
struct Event {
    t_s: f64,
    what: String,
    ok: bool,
}

/// Kills gateway `g` (SIGKILL) and puts a new process in its place at new addresses: out of
/// the proxy's set, the new one in (as discovery would see a rescheduled pod). True when the
/// proxy saw the death and has the new one healthy.
async fn replace(soak: &Soak, admin: SocketAddr, g: &mut Gw) -> bool {
    signal_pid(g.pid, "-KILL");
    // The sessions move on the link's reset; the health checks mark it down.
    let down = until(Duration::from_secs(10), || {
        healthy(admin, &g.name) == Some(false)
    })
    .await;
    let (name, child, listen, gw_admin) = match spawn_gateway(&soak.gateway, &soak.dir, g.index) {
        Ok(x) => x,
        Err(e) => {
            esay!("wasmbed up: soak: cannot start {}: {e}", g.name);
            return false;
        }
    };
    g.pid = child.id();
    g.listen = Some(listen);
    // The old replacement (if any) is reaped here.
    g.child = Some(Killed(child));
    let proxy = wasmbed_client::Admin::new(admin);
    let removed = proxy
        .request("DELETE", &format!("/api/gateways/{name}"), b"")
        .is_ok_and(|a| a.status < 300);
    let body = format!(r#"{{"name":"{name}","address":"{listen}","health_address":"{gw_admin}"}}"#);
    let added = proxy
        .post("/api/gateways", body.as_bytes())
        .is_ok_and(|a| a.status == 201);
    let up = until(Duration::from_secs(15), || {
        healthy(admin, &name) == Some(true)
    })
    .await;
    down && removed && added && up
}

/// Drains gateway `name` with moves, waits for its sessions to leave, takes it back.
async fn drain_and_back(admin: SocketAddr, name: &str) -> bool {
    let proxy = wasmbed_client::Admin::new(admin);
    let drained = proxy
        .post(&format!("/api/gateways/{name}/drain?move=true"), b"")
        .is_ok_and(|a| a.status < 300);
    let emptied = until(Duration::from_secs(30), || {
        gateways_seen(admin).is_some_and(|list| {
            list.iter()
                .any(|g| g["name"].as_str() == Some(name) && g["sessions"].as_u64() == Some(0))
        })
    })
    .await;
    let back = proxy
        .post(&format!("/api/gateways/{name}/undrain"), b"")
        .is_ok_and(|a| a.status < 300);
    drained && emptied && back
}

/// The discovered gateway's role in the samples (a new process every period: not compared).
const DNS_ROLE: &str = "gw-dns";

pub(super) async fn soak_run(mut soak: Soak, run: Run<'_>) -> ExitCode {
    let mut dns = soak.dns.take();
    let Run {
        stack,
        proxy_admin,
        live,
        devices,
        finish,
        running,
        json,
        settle: wait,
        ..
    } = run;
    let (all_up, _) = settle(live, devices, wait).await;
    let duration = soak.duration;
    // Every period: a gateway replaced; every other one a drain, the others a reload.
    let period = soak
        .period
        .unwrap_or_else(|| (duration / 6).clamp(Duration::from_secs(15), Duration::from_secs(300)));
    let sample_every = (duration / 12).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let churn_every = sample_every;
    let warm_up = (duration / 5).max(sample_every * 2);
    say!(
        "soak: {:.0} s; a gateway replaced every {:.0} s (drain or reload between), 1% of the devices away for 3 s every {:.0} s; sampled every {:.0} s; growth checked after {:.0} s",
        duration.as_secs_f64(),
        period.as_secs_f64(),
        churn_every.as_secs_f64(),
        sample_every.as_secs_f64(),
        warm_up.as_secs_f64()
    );
    live.churn_percent.store(1, Relaxed);
    live.churn_away_ms.store(3000, Relaxed);
    let proxy_pid = stack.proxies.first().map(|p| p.pid());
    let mut gws: Vec<Gw> = stack
        .gateways
        .iter()
        .enumerate()
        .map(|(index, (name, child, _))| Gw {
            name: name.clone(),
            index,
            pid: child.id(),
            listen: None,
            child: None,
        })
        .collect();
    // The set as the proxy lists it at the start; a replacement changes one address.
    let Some(mut expected) = names(proxy_admin) else {
        esay!("wasmbed up: soak: the proxy's /api/gateways cannot be read");
        return ExitCode::FAILURE;
    };
    let moves_before = Moves::read(proxy_admin);
    let start = Instant::now();
    let end = start + duration;
    let take = |gws: &[Gw], dns: Option<&DnsGateway>| {
        let mut processes = BTreeMap::new();
        if let Some(u) = proxy_pid.and_then(usage) {
            processes.insert("proxy".to_string(), u);
        }
        if let Some(u) = dns.and_then(|d| usage(d.gw.child.0.id())) {
            processes.insert(DNS_ROLE.to_string(), u);
        }
        for g in gws {
            if let Some(u) = usage(g.pid) {
                processes.insert(g.name.clone(), u);
            }
        }
        if let Some(u) = usage(std::process::id()) {
            processes.insert("fleet".to_string(), u);
        }
        Sample {
            t_s: start.elapsed().as_secs_f64(),
            processes,
            devices_connected: live.connected_now.load(Relaxed),
            proxy_sessions: proxy_sessions(proxy_admin),
            moves: Moves::read(proxy_admin).total() - moves_before.total(),
            sent: live.sent.load(Relaxed),
            answered: live.answered.load(Relaxed),
            state_resets: live.state_resets.load(Relaxed),
            churned: live.churned.load(Relaxed),
        }
    };
    let mut samples = vec![take(&gws, dns.as_ref())];
    let mut events: Vec<Event> = Vec::new();
    let (mut next_sample, mut next_churn) = (start + sample_every, start + churn_every);
    let mut next_event = start + period / 2;
    let mut cycle = 0usize;
    let mut last_said = start;
    loop {
        let wake = next_sample.min(next_churn).min(next_event).min(end);
        tokio::time::sleep_until(wake.into()).await;
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= next_churn {
            live.churn.fetch_add(1, Relaxed);
            next_churn += churn_every;
        }
        if now >= next_sample {
            let s = take(&gws, dns.as_ref());
            if now - last_said >= Duration::from_secs(60) || duration < Duration::from_secs(120) {
                last_said = now;
                say!(
                    "soak t={:.0}s: {} devices on, proxy {} sessions, {:.0} moves, {} churned, {} state resets; RSS proxy {} KiB, fleet {} KiB",
                    s.t_s,
                    s.devices_connected,
                    s.proxy_sessions.map_or("?".into(), |n| n.to_string()),
                    s.moves,
                    s.churned,
                    s.state_resets,
                    s.processes.get("proxy").map_or(0, |u| u.rss_kib),
                    s.processes.get("fleet").map_or(0, |u| u.rss_kib),
                );
            }
            samples.push(s);
            next_sample += sample_every;
        }
        if now >= next_event {
            // Always the last gateway: the others live the whole run, so their footprint
            // has a steady state to check.
            let g = gws.len() - 1;
            let t_s = start.elapsed().as_secs_f64();
            let ok = replace(&soak, proxy_admin, &mut gws[g]).await;
            if let (Some(listen), Some(entry)) = (
                gws[g].listen,
                expected.iter_mut().find(|(n, _)| *n == gws[g].name),
            ) {
                entry.1 = listen.to_string();
            }
            say!(
                "soak t={t_s:.0}s: {} killed and replaced at a new address: {}",
                gws[g].name,
                if ok { "ok" } else { "FAILED" }
            );
            events.push(Event {
                t_s,
                what: format!("kill and replace {}", gws[g].name),
                ok,
            });
            if let Some(d) = dns.as_mut() {
                let t_s = start.elapsed().as_secs_f64();
                let from = d.gw.listen();
                let ok = dns_move(&soak, proxy_admin, d).await;
                let what = format!(
                    "the discovered gateway moved in DNS, {from} -> {} (sessions moved off the old address)",
                    d.gw.listen()
                );
                say!(
                    "soak t={t_s:.0}s: {what}: {}",
                    if ok { "ok" } else { "FAILED" }
                );
                events.push(Event { t_s, what, ok });
                // The set the reload below must keep: the discovered gateway at its new address.
                if let Some(now) = names(proxy_admin) {
                    expected = now;
                }
            }
            let t_s = start.elapsed().as_secs_f64();
            let (what, ok) = if cycle % 2 == 1 {
                let other = &gws[0].name;
                (
                    format!("drain {other} (moves) and undrain"),
                    drain_and_back(proxy_admin, other).await,
                )
            } else if let Some(pid) = proxy_pid {
                // The reload must keep the run-time changes just made: the replaced gateway
                // at its new address (the flags still name the dead one), healthy.
                signal_pid(pid, "-HUP");
                let kept = until(Duration::from_secs(5), || {
                    names(proxy_admin).as_ref() == Some(&expected)
                })
                .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let still = names(proxy_admin).as_ref() == Some(&expected)
                    && healthy(proxy_admin, &gws[g].name) == Some(true);
                (
                    "reload (SIGHUP): the gateway set and addresses kept".to_string(),
                    kept && still,
                )
            } else {
                ("reload: no proxy".to_string(), false)
            };
            say!(
                "soak t={t_s:.0}s: {what}: {}",
                if ok { "ok" } else { "FAILED" }
            );
            events.push(Event { t_s, what, ok });
            cycle += 1;
            next_event += period;
        }
    }
    // Churn stops; every device comes back.
    live.churn_percent.store(0, Relaxed);
    let back = until(Duration::from_secs(60), || {
        live.connected_now.load(Relaxed) == devices
    })
    .await;
    samples.push(take(&gws, dns.as_ref()));
    finish.cancel();
    let report = running.await.unwrap_or_default();
    let replaced = gws.last().map_or(String::new(), |g| g.name.clone());
    let grown = growth(&samples, warm_up.as_secs_f64(), &[&replaced, DNS_ROLE]);
    say!(
        "footprint after the warm-up (median of the first third -> of the last third; bound +10% +{} MiB RSS, +10% +{FDS_SLACK} descriptors; {replaced} and {DNS_ROLE}, replaced every period, not compared):",
        RSS_SLACK_KIB / 1024
    );
    for g in &grown {
        say!(
            "  {:<8} RSS {:>7} -> {:>7} KiB   descriptors {:>5} -> {:>5}   {}",
            g.process,
            g.rss_first_kib,
            g.rss_last_kib,
            g.fds_first,
            g.fds_last,
            if g.within_bound { "ok" } else { "GREW" }
        );
    }
    let failed_events = events.iter().filter(|e| !e.ok).count();
    let moves = Moves::read(proxy_admin).total() - moves_before.total();
    say!(
        "events: {} ({} failed); moves {moves:.0}; devices left and came back {} times",
        events.len(),
        failed_events,
        live.churned.load(Relaxed)
    );
    say!(
        "messages: sent {} answered {} lost {} duplicated {}; app state restarted on {} devices",
        report.messages.sent,
        report.messages.answered,
        report.messages.lost,
        report.messages.duplicated,
        report.state_resets
    );
    say_raw!("{}", report.table());
    let checks = [
        (all_up, "every device connected before the soak"),
        (back, "every device connected at the end"),
        (report.messages.lost == 0, "no message lost"),
        (report.messages.duplicated == 0, "no message duplicated"),
        (report.state_resets == 0, "no app state restarted"),
        (!events.is_empty() && failed_events == 0, "every event done"),
        (!grown.is_empty(), "enough samples after the warm-up"),
        (
            grown.iter().all(|g| g.within_bound),
            "no growth past the bound after the warm-up",
        ),
    ];
    let doc = serde_json::json!({
        "scenario": "soak",
        "devices": devices,
        "duration_s": duration.as_secs_f64(),
        "period_s": period.as_secs_f64(),
        "sample_every_s": sample_every.as_secs_f64(),
        "warm_up_s": warm_up.as_secs_f64(),
        "events": events,
        "growth": grown,
        "moves": moves,
        "churned": live.churned.load(Relaxed),
        "sent": report.messages.sent,
        "answered": report.messages.answered,
        "lost": report.messages.lost,
        "duplicated": report.messages.duplicated,
        "state_resets": report.state_resets,
        "samples": samples,
    });
    conclude(&checks, doc, json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(rss: impl Fn(usize) -> u64, fds: impl Fn(usize) -> u64) -> Vec<Sample> {
        (0..30)
            .map(|i| Sample {
                t_s: i as f64 * 10.0,
                processes: BTreeMap::from([(
                    "proxy".to_string(),
                    Usage {
                        rss_kib: rss(i),
                        fds: fds(i),
                    },
                )]),
                devices_connected: 0,
                proxy_sessions: None,
                moves: 0.0,
                sent: 0,
                answered: 0,
                state_resets: 0,
                churned: 0,
            })
            .collect()
    }

    #[test]
    fn flat_after_warm_up_passes_and_growth_fails() {
        // A steep warm-up, then flat with noise: within the bound.
        let flat = series(
            |i| {
                if i < 5 {
                    10_000 * i as u64
                } else {
                    60_000 + (i as u64 % 3) * 500
                }
            },
            |i| 40 + i as u64 % 2,
        );
        let g = growth(&flat, 50.0, &[]);
        assert_eq!(g.len(), 1);
        assert!(g[0].within_bound, "{g:?}");
        // 1 MiB a sample: a leak.
        let leak = series(|i| 60_000 + 1024 * i as u64, |_| 40);
        assert!(!growth(&leak, 50.0, &[])[0].within_bound);
        assert!(
            growth(&leak, 50.0, &["proxy"]).is_empty(),
            "a replaced role is not compared"
        );
        // Descriptors that never close.
        let fds = series(|_| 60_000, |i| 40 + 2 * i as u64);
        assert!(!growth(&fds, 50.0, &[])[0].within_bound);
        // Too few samples: no verdict.
        assert!(growth(&flat[..8], 50.0, &[]).is_empty());
    }
}
