//! The scenarios of `wasmbed up`: failover, drain and scale-up, each with its checks.

use super::*;

/// Waits (at most `wait`) until every device is connected; prints and returns the spread.
pub(super) async fn settle(
    live: &wasmbed_loadtest::Live,
    devices: usize,
    wait: Duration,
) -> (bool, BTreeMap<String, usize>) {
    use std::sync::atomic::Ordering::Relaxed;
    // Connected, and holding a ticket (a first REPLY and its CHECKPOINT): only then can a
    // device resume its session elsewhere.
    let all_up = until(wait, || {
        live.connected_now.load(Relaxed) == devices && live.ticketed.load(Relaxed) == devices
    })
    .await;
    let before = live.spread();
    say!(
        "spread before: {}  (max-min {})",
        spread_line(&before),
        max_minus_min(&before)
    );
    (all_up, before)
}

/// Prints the checks, writes `doc` (with the failed checks) to `json`, and gives the exit code.
pub(super) fn conclude(
    checks: &[(bool, &str)],
    mut doc: serde_json::Value,
    json: Option<&Path>,
) -> ExitCode {
    let failed: Vec<&str> = checks.iter().filter(|c| !c.0).map(|c| c.1).collect();
    doc["failed_checks"] = serde_json::json!(failed);
    if let Some(path) = json
        && let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
    {
        esay!("wasmbed up: cannot write {}: {e}", path.display());
    }
    if failed.is_empty() {
        say!("all checks passed");
        ExitCode::SUCCESS
    } else {
        failed.iter().for_each(|f| say!("FAILED: {f}"));
        ExitCode::FAILURE
    }
}

/// A scenario's stack, fleet and output, as `up` hands them over.
pub(super) struct Run<'a> {
    pub(super) stack: &'a Stack,
    pub(super) mode: Mode,
    pub(super) proxy_admin: SocketAddr,
    pub(super) live: &'a wasmbed_loadtest::Live,
    pub(super) devices: usize,
    pub(super) finish: CancellationToken,
    pub(super) running: tokio::task::JoinHandle<Report>,
    pub(super) json: Option<&'a Path>,
    /// How long the fleet gets to connect and hold its tickets before the event.
    pub(super) settle: Duration,
}

pub(super) async fn scenario_run(scenario: Scenario, run: Run<'_>) -> ExitCode {
    use std::sync::atomic::Ordering::Relaxed;
    if run.mode == Mode::Terminate {
        return moving_run(scenario, run).await;
    }
    let Run {
        stack,
        live,
        devices,
        finish,
        running,
        json,
        settle: wait,
        ..
    } = run;
    let (all_up, before) = settle(live, devices, wait).await;
    let (victim, child, victim_admin) = &stack.gateways[0];
    let affected = before.get(victim).copied().unwrap_or(0);
    let rehomed_before = live.rehomed.load(Relaxed);
    let event = Instant::now();
    match scenario {
        Scenario::Failover => {
            say!("killing {victim} (SIGKILL) with {affected} devices on it");
            signal(child, "-KILL");
        }
        Scenario::Hang => {
            say!("stopping {victim} (SIGSTOP) with {affected} devices on it");
            signal(child, "-STOP");
        }
        // (The proxy events run in `proxy_run`, the storm and the soak in their own.)
        Scenario::Drain
        | Scenario::Goaway
        | Scenario::ScaleUp
        | Scenario::ProxyKill
        | Scenario::ProxyKillHeld
        | Scenario::ProxyRestart
        | Scenario::ProxyUpgrade
        | Scenario::Storm
        | Scenario::Soak => {
            say!("draining {victim} with {affected} devices on it");
            gateway_drain(*victim_admin);
        }
    }
    let rehomed = until(Duration::from_secs(30), || {
        live.rehomed.load(Relaxed) - rehomed_before >= affected
            && live.connected_now.load(Relaxed) == devices
    })
    .await;
    let rehome_all = event.elapsed();
    // Keep sending for a moment on the new gateways, then end and wait for the last replies.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = live.spread();
    finish.cancel();
    let report = running.await.unwrap_or_default();
    let lost = report.messages.lost;
    say!(
        "spread after:  {}  (max-min {})",
        spread_line(&after),
        max_minus_min(&after)
    );
    say!(
        "re-homed {}/{affected} devices, all within {:.0} ms; re-home p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        live.rehomed.load(Relaxed) - rehomed_before,
        rehome_all.as_secs_f64() * 1e3,
        report.rehome_us.p50 as f64 / 1e3,
        report.rehome_us.p99 as f64 / 1e3,
        report.rehome_us.max as f64 / 1e3
    );
    say!(
        "messages: sent {} answered {} lost {} duplicated {}",
        report.messages.sent,
        report.messages.answered,
        lost,
        report.messages.duplicated
    );
    say!(
        "sessions: {} resumed from their tickets, refused {:?}; app state restarted on {} devices (state_resets)",
        report.resumed,
        report.resume_refused,
        report.state_resets
    );
    say_raw!("{}", report.table());
    let checks = [
        (
            all_up,
            "every device connected (and held a ticket) before the event",
        ),
        (rehomed, "every affected device re-homed"),
        (max_minus_min(&before) <= 1, "spread before: max - min <= 1"),
        (
            max_minus_min(&after) <= 1 && !after.contains_key(victim),
            "spread after: max - min <= 1",
        ),
        (lost == 0, "no message lost"),
        (
            report.state_resets == 0,
            "no app state restarted (state_resets == 0)",
        ),
        (
            report.resumed as usize >= affected,
            "every affected device resumed its session",
        ),
    ];
    let doc = serde_json::json!({
        "scenario": format!("{scenario:?}").to_lowercase(),
        "devices": devices,
        "gateways": stack.gateways.len(),
        "victim": victim,
        "affected": affected,
        "rehomed": live.rehomed.load(Relaxed) - rehomed_before,
        "rehome_all_ms": rehome_all.as_secs_f64() * 1e3,
        "state_resets": report.state_resets,
        "spread_before": before,
        "spread_after": after,
        "report": report,
    });
    conclude(&checks, doc, json)
}

/// Sends `sig` (`-KILL`, `-STOP`, `-CONT`, `-TERM`, `-HUP`) to a child, with kill(2) itself
/// (rustix's safe wrapper): no `kill` program is needed (the container image has none).
fn signal(child: &Child, sig: &str) {
    signal_pid(child.id(), sig);
}

pub(super) fn signal_pid(pid: u32, sig: &str) {
    use rustix::process::{Pid, Signal, kill_process};
    let signal = match sig {
        "-STOP" => Signal::STOP,
        "-TERM" => Signal::TERM,
        "-CONT" => Signal::CONT,
        "-HUP" => Signal::HUP,
        _ => Signal::KILL,
    };
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    // A child already gone: nothing to signal.
    let _ = kill_process(pid, signal);
}

/// A gateway's own drain: GOAWAY to its sessions, no new ones.
fn gateway_drain(admin: SocketAddr) {
    if let Err(e) = wasmbed_client::Admin::new(admin).post("/api/drain", b"") {
        esay!("wasmbed up: {e}");
    }
}

/// The proxy's view: live sessions per gateway that is up.
fn proxy_spread(admin: SocketAddr) -> BTreeMap<String, usize> {
    gateways_seen(admin)
        .unwrap_or_default()
        .iter()
        .filter(|g| g["healthy"].as_bool() == Some(true) && g["draining"].as_bool() == Some(false))
        .filter_map(|g| {
            Some((
                g["name"].as_str()?.to_string(),
                g["sessions"].as_u64()? as usize,
            ))
        })
        .collect()
}

/// The proxy's `/api/gateways` list; `None` when it cannot be read.
pub(super) fn gateways_seen(admin: SocketAddr) -> Option<Vec<serde_json::Value>> {
    let answer = wasmbed_client::Admin::new(admin)
        .get("/api/gateways")
        .ok()?;
    serde_json::from_str(&answer.body).ok()
}

/// Whether the proxy has `name` up (an unreadable answer counts as up: no verdict).
fn gateway_up(admin: SocketAddr, name: &str) -> bool {
    gateways_seen(admin)
        .unwrap_or_default()
        .iter()
        .find(|g| g["name"].as_str() == Some(name))
        .is_none_or(|g| g["healthy"].as_bool() != Some(false))
}

/// What the proxy counted of moves: by result, and the pause histogram's buckets.
#[derive(Debug, Default, Clone)]
pub(super) struct Moves {
    by_result: BTreeMap<String, f64>,
    /// `(upper bound in seconds, cumulative count)`.
    pause: Vec<(f64, f64)>,
    /// Sessions moving now (no gateway yet).
    held: f64,
    /// TLS handshakes with the gateways, by kind (full, resumed).
    handshakes: BTreeMap<String, f64>,
}

impl Moves {
    pub(super) fn read(admin: SocketAddr) -> Moves {
        let Ok(answer) = wasmbed_client::Admin::new(admin).get("/metrics") else {
            return Moves::default();
        };
        let lines = answer.body.lines().map(|l| Ok(l.to_string()));
        let Ok(scrape) = prometheus_parse::Scrape::parse(lines) else {
            return Moves::default();
        };
        let mut m = Moves::default();
        for s in scrape.samples {
            match (s.metric.as_str(), s.value) {
                ("wasmbed_proxy_session_moves_total", prometheus_parse::Value::Counter(v)) => {
                    let result = s.labels.get("result").unwrap_or("?").to_string();
                    *m.by_result.entry(result).or_default() += v;
                }
                ("wasmbed_proxy_move_pause_seconds", prometheus_parse::Value::Histogram(h)) => {
                    m.pause = h.iter().map(|b| (b.less_than, b.count)).collect();
                }
                ("wasmbed_proxy_sessions_held", prometheus_parse::Value::Gauge(v)) => m.held = v,
                (
                    "wasmbed_proxy_upstream_handshakes_total",
                    prometheus_parse::Value::Counter(v),
                ) => {
                    let kind = s.labels.get("kind").unwrap_or("?").to_string();
                    m.handshakes.insert(kind, v);
                }
                _ => {}
            }
        }
        m
    }

    pub(super) fn total(&self) -> f64 {
        self.by_result.values().sum()
    }

    /// Moves since `before`, by result.
    fn since(&self, before: &Moves) -> BTreeMap<String, f64> {
        self.by_result
            .iter()
            .map(|(k, v)| (k.clone(), v - before.by_result.get(k).unwrap_or(&0.0)))
            .filter(|(_, v)| *v > 0.0)
            .collect()
    }

    /// The bucket bound under which a `q` share of the pauses since `before` fell (ms).
    pub(super) fn pause_quantile_ms(&self, before: &Moves, q: f64) -> Option<f64> {
        let base = |le: f64| before.pause.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
        let deltas: Vec<(f64, f64)> = self.pause.iter().map(|b| (b.0, b.1 - base(b.0))).collect();
        let total = deltas.last()?.1;
        if total <= 0.0 {
            return None;
        }
        deltas.iter().find(|b| b.1 >= q * total).map(|b| b.0 * 1e3)
    }
}

/// How long the moving scenarios watch the replies' waits before their event (the steady
/// state the event's waits are set beside).
const STEADY: Duration = Duration::from_secs(2);

/// Terminate mode: the proxy moves the sessions (failover: a SIGKILL; drain: the proxy's
/// `drain?move=true`); the devices should notice nothing.
async fn moving_run(scenario: Scenario, run: Run<'_>) -> ExitCode {
    use std::sync::atomic::Ordering::Relaxed;
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
    // The replies' waits in a steady moment before the event, to set the event's beside.
    live.log_replies();
    tokio::time::sleep(STEADY).await;
    let before = proxy_spread(proxy_admin);
    let (victim, child, victim_admin) = &stack.gateways[0];
    let affected = before.get(victim).copied().unwrap_or(0);
    let moves_before = Moves::read(proxy_admin);
    let rehomed_before = live.rehomed.load(Relaxed);
    let event = Instant::now();
    match scenario {
        Scenario::Failover => {
            say!("killing {victim} (SIGKILL) with {affected} sessions on it");
            signal(child, "-KILL");
        }
        Scenario::Hang => {
            say!("stopping {victim} (SIGSTOP) with {affected} sessions on it");
            signal(child, "-STOP");
        }
        Scenario::Goaway => {
            say!("{victim} drains itself (GOAWAY) with {affected} sessions on it");
            gateway_drain(*victim_admin);
        }
        Scenario::Drain
        | Scenario::ScaleUp
        | Scenario::ProxyKill
        | Scenario::ProxyKillHeld
        | Scenario::ProxyRestart
        | Scenario::ProxyUpgrade
        | Scenario::Storm
        | Scenario::Soak => {
            say!("draining {victim} by moving its {affected} sessions");
            let path = format!("/api/gateways/{victim}/drain?move=true");
            if let Err(e) = wasmbed_client::Admin::new(proxy_admin).post(&path, b"") {
                esay!("wasmbed up: {e}");
            }
        }
    }
    // Failover and hang: when the proxy marked the victim down (polled every 2 ms: the
    // detection as seen from outside the proxy, to within a poll).
    let detected = match scenario {
        Scenario::Failover | Scenario::Hang => {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if !gateway_up(proxy_admin, victim) {
                    break Some(event.elapsed());
                }
                if Instant::now() > deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        _ => None,
    };
    let moved = until(Duration::from_secs(30), || {
        let moves = Moves::read(proxy_admin);
        let spread = proxy_spread(proxy_admin);
        moves.total() - moves_before.total() >= affected as f64
            && moves.held == 0.0
            && spread.get(victim).copied().unwrap_or(0) == 0
    })
    .await;
    let emptied = event.elapsed();
    // Keep sending for a moment on the new gateways, then end and wait for the last replies.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = proxy_spread(proxy_admin);
    let moves = Moves::read(proxy_admin);
    let disconnects = live.rehomed.load(Relaxed) - rehomed_before
        + devices.saturating_sub(live.connected_now.load(Relaxed));
    let (steady, around) = live.reply_waits_around(event, STEADY);
    finish.cancel();
    let report = running.await.unwrap_or_default();
    let by_result = moves.since(&moves_before);
    let (p50, p99) = (
        moves.pause_quantile_ms(&moves_before, 0.5),
        moves.pause_quantile_ms(&moves_before, 0.99),
    );
    let show = |q: Option<f64>| q.map_or("-".to_string(), |v| format!("<= {v:.1} ms"));
    say!(
        "spread after:  {}  (max-min {})",
        spread_line(&after),
        max_minus_min(&after)
    );
    say!(
        "moved {:.0}/{affected} sessions {by_result:?}, {victim} empty after {:.0} ms; pause p50 {} p99 {} (proxy histogram buckets); longest wait a device saw for a reply in the whole run (its connect storm included) {:.1} ms",
        moves.total() - moves_before.total(),
        emptied.as_secs_f64() * 1e3,
        show(p50),
        show(p99),
        report.reply_us.max as f64 / 1e3
    );
    say!(
        "device-side, the replies' waits: in the {:.0} s before the event p50 {:.1} ms p99 {:.1} ms max {:.1} ms ({} replies); from the event to the end p50 {:.1} ms p99 {:.1} ms max {:.1} ms ({} replies)",
        STEADY.as_secs_f64(),
        steady.p50_ms,
        steady.p99_ms,
        steady.max_ms,
        steady.count,
        around.p50_ms,
        around.p99_ms,
        around.max_ms,
        around.count
    );
    if let Some(d) = detected {
        say!(
            "{victim} marked down by the proxy {:.1} ms after the {}",
            d.as_secs_f64() * 1e3,
            if scenario == Scenario::Hang {
                "SIGSTOP"
            } else {
                "SIGKILL"
            }
        );
    }
    let handshakes: BTreeMap<&String, f64> = moves
        .handshakes
        .iter()
        .map(|(k, v)| (k, v - moves_before.handshakes.get(k).unwrap_or(&0.0)))
        .collect();
    say!("TLS handshakes with the gateways during the moves: {handshakes:?}");
    say!(
        "devices that saw a disconnect: {disconnects}; messages: sent {} answered {} lost {} duplicated {}; app state restarted on {} devices",
        report.messages.sent,
        report.messages.answered,
        report.messages.lost,
        report.messages.duplicated,
        report.state_resets
    );
    say_raw!("{}", report.table());
    let failed_moves = by_result.get("failed").copied().unwrap_or(0.0);
    let checks = [
        (all_up, "every device connected before the event"),
        (moved, "every session of the victim moved"),
        (disconnects == 0, "no device saw a disconnect"),
        (max_minus_min(&before) <= 1, "spread before: max - min <= 1"),
        (
            max_minus_min(&after) <= 1 && after.get(victim).copied().unwrap_or(0) == 0,
            "spread after: max - min <= 1, the victim empty",
        ),
        (report.messages.lost == 0, "no message lost"),
        (report.messages.duplicated == 0, "no message answered twice"),
        (
            report.state_resets == 0,
            "no app state restarted (state_resets == 0)",
        ),
        (failed_moves == 0.0, "no move failed"),
    ];
    let doc = serde_json::json!({
        "scenario": format!("{scenario:?}").to_lowercase(),
        "mode": "terminate",
        "devices": devices,
        "gateways": stack.gateways.len(),
        "victim": victim,
        "affected": affected,
        "moves": by_result,
        "emptied_ms": emptied.as_secs_f64() * 1e3,
        "detected_ms": detected.map(|d| d.as_secs_f64() * 1e3),
        "longest_reply_wait_ms": report.reply_us.max as f64 / 1e3,
        "reply_wait_before_event": steady,
        "reply_wait_after_event": around,
        "pause_p50_ms_bucket": p50,
        "pause_p99_ms_bucket": p99,
        "disconnects": disconnects,
        "state_resets": report.state_resets,
        "spread_before": before,
        "spread_after": after,
        "report": report,
    });
    conclude(&checks, doc, json)
}

/// What the scale-up scenario needs besides the stack.
pub(super) struct ScaleUp {
    /// How the added gateway runs.
    pub(super) gateway: super::GatewayRun,
    pub(super) dir: PathBuf,
    pub(super) proxy_admin: SocketAddr,
    /// The second fleet, started once the new gateway is in.
    pub(super) second: LoadtestSettings,
}

/// A child process killed when dropped.
pub(super) struct Killed(pub(super) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) async fn scale_up(scale: ScaleUp, run: Run<'_>) -> ExitCode {
    use std::sync::atomic::Ordering::Relaxed;
    let Run {
        stack,
        mode,
        proxy_admin,
        live,
        devices,
        finish,
        running,
        json,
        settle: wait,
    } = run;
    let (all_up, before) = settle(live, devices, wait).await;
    let moves_before = Moves::read(proxy_admin);
    let index = stack.gateways.len();
    // As the others run (`--no-tls-tickets` and `--gateway-arg` included), with room for the
    // fleet over the gateways there will be.
    let run = scale
        .gateway
        .with_room(super::gateway_capacity(devices, index + 1));
    let (name, child, listen, gw_admin) = match spawn_gateway(&run, &scale.dir, index) {
        Ok(g) => g,
        Err(e) => {
            esay!("wasmbed up: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _new_gateway = Killed(child);
    let added_at = Instant::now();
    let body = format!(r#"{{"name":"{name}","address":"{listen}","health_address":"{gw_admin}"}}"#);
    let added = match wasmbed_client::Admin::new(scale.proxy_admin)
        .post("/api/gateways", body.as_bytes())
    {
        Ok(answer) => answer.status == 201,
        Err(e) => {
            esay!("wasmbed up: {e}");
            false
        }
    };
    say!(
        "added {name} under load: {}",
        if added {
            "accepted by the proxy"
        } else {
            "REFUSED"
        }
    );
    // Passthrough: new devices show where new sessions go. Terminate: no new devices; the
    // sessions already live rebalance onto the new gateway.
    let second = match mode {
        Mode::Terminate => None,
        Mode::Passthrough => match Fleet::prepare(scale.second) {
            Ok(f) => Some(f),
            Err(e) => {
                esay!("wasmbed up: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let mut second_up = true;
    let mut running2 = None;
    let mut new_spread = BTreeMap::new();
    if let Some(second) = second {
        let new_devices = second.live().gateway.lock().map(|g| g.len()).unwrap_or(0);
        let live2 = second.live();
        running2 = Some(tokio::spawn(second.run(finish.clone())));
        say!("{new_devices} new devices dialing");
        second_up = until(Duration::from_secs(60), || {
            live2.connected_now.load(Relaxed) == new_devices
        })
        .await;
        new_spread = live2.spread();
    }
    let mut after = live.spread();
    for (g, n) in &new_spread {
        *after.entry(g.clone()).or_default() += n;
    }
    if mode == Mode::Passthrough {
        say!("new sessions: {}", spread_line(&new_spread));
    }
    // Terminate mode rebalances the sessions already live: the proxy's view is the truth
    // (a moved device still names the gateway of its WELCOME).
    let mut rebalanced_ms = None;
    if mode == Mode::Terminate {
        // Balanced by the proxy's counts, and the moves done (a move counts on its new
        // gateway from the moment it dials it).
        let balanced = until(Duration::from_secs(30), || {
            let s = proxy_spread(proxy_admin);
            let moves = Moves::read(proxy_admin);
            max_minus_min(&s) <= 1
                && s.contains_key(&name)
                && moves.held == 0.0
                && moves.total() > moves_before.total()
        })
        .await;
        after = proxy_spread(proxy_admin);
        if balanced {
            rebalanced_ms = Some(added_at.elapsed().as_secs_f64() * 1e3);
        }
        let moved = Moves::read(proxy_admin).since(&moves_before);
        say!(
            "rebalanced: {} (moves {moved:?})",
            rebalanced_ms.map_or("NO".to_string(), |ms| format!(
                "max-min <= 1 over all sessions {ms:.0} ms after the gateway joined"
            ))
        );
    }
    say!(
        "spread after:  {}  (max-min {})",
        spread_line(&after),
        max_minus_min(&after)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    finish.cancel();
    let r1 = running.await.unwrap_or_default();
    let r2 = match running2 {
        Some(r) => r.await.unwrap_or_default(),
        None => Report::default(),
    };
    let lost = r1.messages.lost + r2.messages.lost;
    for (reason, n) in &r2.failed {
        say!("new devices that never connected: {n} ({reason})");
    }
    say!(
        "messages: sent {} answered {} lost {lost}",
        r1.messages.sent + r2.messages.sent,
        r1.messages.answered + r2.messages.answered
    );
    let checks = [
        (all_up && second_up, "every device connected"),
        (added, "the proxy took the new gateway"),
        (max_minus_min(&before) <= 1, "spread before: max - min <= 1"),
        (
            max_minus_min(&after) <= 1 && after.contains_key(&name),
            "spread after: max - min <= 1, new gateway in use",
        ),
        (lost == 0, "no message lost"),
        (
            mode == Mode::Passthrough || (rebalanced_ms.is_some() && r1.reconnects == 0),
            "terminate: live sessions rebalanced, no device saw a disconnect",
        ),
    ];
    let doc = serde_json::json!({
        "scenario": "scale-up",
        "reconnects": r1.reconnects + r2.reconnects,
        "rebalanced_ms": rebalanced_ms,
        "added": name,
        "spread_before": before,
        "new_sessions": new_spread,
        "spread_after": after,
        "lost": lost,
    });
    conclude(&checks, doc, json)
}

/// Device sessions a proxy holds now (every gateway's, up or not).
pub(super) fn proxy_sessions(admin: SocketAddr) -> Option<usize> {
    let list = gateways_seen(admin)?;
    Some(
        list.iter()
            .filter_map(|g| g["sessions"].as_u64())
            .sum::<u64>() as usize,
    )
}

/// One proxy replica of several is killed (SIGKILL) or stopped (SIGTERM, then a new replica
/// started on the same address); the devices it held reconnect through the others. What the
/// devices saw is the fleet's own count.
pub(super) async fn proxy_run(scenario: Scenario, run: Run<'_>) -> ExitCode {
    use std::sync::atomic::Ordering::Relaxed;
    let Run {
        stack,
        mode,
        live,
        devices,
        finish,
        running,
        json,
        settle: wait,
        ..
    } = run;
    let (all_up, _) = settle(live, devices, wait).await;
    let Some(victim) = stack.proxies.first() else {
        esay!("wasmbed up: no proxy to stop");
        return ExitCode::FAILURE;
    };
    let per_proxy: Vec<usize> = stack
        .proxies
        .iter()
        .map(|p| proxy_sessions(p.admin).unwrap_or(0))
        .collect();
    let affected = per_proxy.first().copied().unwrap_or(0);
    say!(
        "sessions per proxy: {}",
        per_proxy
            .iter()
            .enumerate()
            .map(|(i, n)| format!("proxy-{i}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let (disconnects0, cut0, goaway0, rehomed0) = (
        live.disconnects.load(Relaxed),
        live.cut.load(Relaxed),
        live.left_on_goaway.load(Relaxed),
        live.rehomed.load(Relaxed),
    );
    let killed = matches!(scenario, Scenario::ProxyKill | Scenario::ProxyKillHeld);
    // proxy-kill-held: sessions the replica held, waiting for a gateway, when it was killed.
    let mut held = None;
    if scenario == Scenario::ProxyKillHeld {
        say!("stopping every gateway (SIGSTOP) until proxy-0 holds sessions waiting for one");
        for (_, child, _) in &stack.gateways {
            signal(child, "-STOP");
        }
        let holding = until(Duration::from_secs(30), || {
            Moves::read(victim.admin).held >= 1.0
        })
        .await;
        held = holding.then(|| Moves::read(victim.admin).held as u64);
    }
    let event = Instant::now();
    let mut replacement = None;
    if scenario == Scenario::ProxyUpgrade {
        // The new process on the same address and admin address, with the same --takeover.
        let listen = stack
            .proxy_listen
            .map(|a| a.to_string())
            .unwrap_or_default();
        say!("upgrading proxy-0 in place (--takeover) with {affected} device sessions on it");
        match spawn_proxy(&stack.proxy_args, &listen, &victim.admin.to_string()) {
            Ok((p, _)) => replacement = Some(p),
            Err(e) => esay!("wasmbed up: the new process did not start: {e}"),
        }
    } else {
        let sig = if killed { "-KILL" } else { "-TERM" };
        say!(
            "{} proxy-0 (SIG{}) with {affected} device sessions on it",
            if sig == "-KILL" {
                "killing"
            } else {
                "stopping"
            },
            &sig[1..]
        );
        signal_pid(victim.pid(), sig);
        if scenario == Scenario::ProxyKillHeld {
            say!(
                "proxy-0 held {} sessions waiting for a gateway; the gateways go on (SIGCONT)",
                held.unwrap_or(0)
            );
            for (_, child, _) in &stack.gateways {
                signal(child, "-CONT");
            }
        }
    }
    // Gone: exited (SIGTERM: once every session is handed back, or `grace` for the rest).
    let gone = until(Duration::from_secs(60), || victim.exited()).await;
    let gone_after = event.elapsed();
    if scenario == Scenario::ProxyRestart {
        let listen = stack
            .proxy_listen
            .map(|a| a.to_string())
            .unwrap_or_default();
        match spawn_proxy(&stack.proxy_args, &listen, "127.0.0.1:0") {
            Ok((p, _)) => {
                say!(
                    "proxy-0 gone after {:.0} ms; a new replica is serving on {listen} {:.0} ms after the SIGTERM (admin http://{})",
                    gone_after.as_secs_f64() * 1e3,
                    event.elapsed().as_secs_f64() * 1e3,
                    p.admin
                );
                replacement = Some(p);
            }
            Err(e) => esay!("wasmbed up: the new replica did not start: {e}"),
        }
    }
    // An upgrade in passthrough moves every session: none comes back, for none left.
    let kept = scenario == Scenario::ProxyUpgrade && mode == Mode::Passthrough;
    let expected = if kept { 0 } else { affected };
    let back = until(Duration::from_secs(60), || {
        live.rehomed.load(Relaxed) - rehomed0 >= expected
            && live.connected_now.load(Relaxed) == devices
    })
    .await;
    let all_back = event.elapsed();
    // Keep sending for a moment through the survivors, then end and wait for the last replies.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (crest, last_back) = live.wave(event, Duration::from_millis(100));
    let disconnects = live.disconnects.load(Relaxed) - disconnects0;
    let cut = live.cut.load(Relaxed) - cut0;
    let left_on_goaway = live.left_on_goaway.load(Relaxed) - goaway0;
    let rehomed = live.rehomed.load(Relaxed) - rehomed0;
    let new_serving = match &replacement {
        Some(p) => proxy_sessions(p.admin).is_some(),
        None => false,
    };
    finish.cancel();
    let report = running.await.unwrap_or_default();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    say!(
        "proxy-0 gone after {:.0} ms; {rehomed}/{affected} devices back through the other replicas, the last {}; all connected after {:.0} ms",
        ms(gone_after),
        last_back.map_or("-".into(), |d| format!("{:.0} ms after the signal", ms(d))),
        ms(all_back)
    );
    say!(
        "devices that saw a disconnect: {disconnects} (after a GOAWAY {left_on_goaway}, cut {cut}); reconnect wave: at most {crest} devices back within 100 ms"
    );
    say!(
        "re-home p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (device-side: from the drop to the next WELCOME); longest wait a device saw for a reply {:.1} ms",
        report.rehome_us.p50 as f64 / 1e3,
        report.rehome_us.p99 as f64 / 1e3,
        report.rehome_us.max as f64 / 1e3,
        report.reply_us.max as f64 / 1e3
    );
    say!(
        "messages: sent {} answered {} lost {} duplicated {}; sessions resumed {}, refused {:?}; app state restarted on {} devices",
        report.messages.sent,
        report.messages.answered,
        report.messages.lost,
        report.messages.duplicated,
        report.resumed,
        report.resume_refused,
        report.state_resets
    );
    say_raw!("{}", report.table());
    let handed_back = !killed && mode == Mode::Terminate;
    let checks = [
        (
            all_up,
            "every device connected (and held a ticket) before the event",
        ),
        (affected > 0, "the stopped replica held sessions"),
        (gone, "the stopped replica exited"),
        (back, "every device of the stopped replica came back"),
        (report.messages.lost == 0, "no message lost"),
        (report.messages.duplicated == 0, "no message answered twice"),
        (
            report.state_resets == 0,
            "no app state restarted (state_resets == 0)",
        ),
        (
            !handed_back || cut == 0,
            "terminate, SIGTERM: every session handed back with GOAWAY, none cut",
        ),
        (killed || new_serving, "the new process serves"),
        (
            scenario != Scenario::ProxyKillHeld || held.is_some_and(|n| n > 0),
            "proxy-kill-held: the replica held sessions waiting for a gateway when it was killed",
        ),
        (
            !kept || disconnects == 0,
            "passthrough upgrade: no device saw a disconnect (every session moved to the new process)",
        ),
    ];
    let doc = serde_json::json!({
        "scenario": match scenario {
            Scenario::ProxyKill => "proxy-kill",
            Scenario::ProxyKillHeld => "proxy-kill-held",
            Scenario::ProxyUpgrade => "proxy-upgrade",
            _ => "proxy-restart",
        },
        "mode": format!("{mode:?}").to_lowercase(),
        "devices": devices,
        "proxies": stack.proxies.len(),
        "gateways": stack.gateways.len(),
        "affected": affected,
        "held_when_killed": held,
        "sessions_per_proxy": per_proxy,
        "gone_ms": ms(gone_after),
        "all_back_ms": ms(all_back),
        "last_back_ms": last_back.map(ms),
        "rehomed": rehomed,
        "disconnects": disconnects,
        "left_on_goaway": left_on_goaway,
        "cut": cut,
        "wave_crest_per_100ms": crest,
        "state_resets": report.state_resets,
        "report": report,
    });
    drop(replacement);
    conclude(&checks, doc, json)
}
