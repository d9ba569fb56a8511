//! `wasmbed up --scenario storm`: every device drops its connection at the same instant (a
//! network blip, a zone lost) and reconnects at once by its session's rules; what the proxy
//! makes of N simultaneous handshakes, as the devices see it.

use super::cpu;
use super::scenarios::{conclude, settle};
use super::*;

/// What the proxy's `/metrics` says about handshakes and health, read before and after.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// Device handshakes finished (TLS over TCP and QUIC).
    finished: f64,
    /// Refusals, by reason.
    refused: BTreeMap<String, f64>,
    /// Health transitions to down.
    downs: f64,
    /// Devices' TLS tickets presented: opened (a resumed handshake) and refused.
    tickets_opened: f64,
    tickets_refused: f64,
}

impl Seen {
    /// The proxy's figures now; `None` when its `/metrics` cannot be read.
    fn read(admin: SocketAddr) -> Option<Seen> {
        let answer = wasmbed_client::Admin::new(admin).get("/metrics").ok()?;
        let lines = answer.body.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).ok()?;
        let mut seen = Seen::default();
        for s in scrape.samples {
            match (s.metric.as_str(), &s.value) {
                (
                    "wasmbed_proxy_handshake_duration_seconds",
                    prometheus_parse::Value::Histogram(h),
                ) => seen.finished += h.last().map_or(0.0, |b| b.count),
                (
                    "wasmbed_proxy_connections_rejected_total",
                    prometheus_parse::Value::Counter(v),
                ) => {
                    let reason = s.labels.get("reason").unwrap_or("?").to_string();
                    *seen.refused.entry(reason).or_default() += v;
                }
                (
                    "wasmbed_proxy_gateway_transitions_total",
                    prometheus_parse::Value::Counter(v),
                ) if s.labels.get("to") == Some("down") => seen.downs += v,
                ("wasmbed_proxy_tls_tickets_total", prometheus_parse::Value::Counter(v)) => {
                    match s.labels.get("result") {
                        Some("opened") => seen.tickets_opened += v,
                        Some("refused") => seen.tickets_refused += v,
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        Some(seen)
    }

    /// What happened between `before` and `self`.
    fn since(&self, before: &Seen) -> Seen {
        let mut refused = BTreeMap::new();
        for (reason, n) in &self.refused {
            let d = n - before.refused.get(reason).copied().unwrap_or(0.0);
            if d > 0.0 {
                refused.insert(reason.clone(), d);
            }
        }
        Seen {
            finished: self.finished - before.finished,
            refused,
            downs: self.downs - before.downs,
            tickets_opened: self.tickets_opened - before.tickets_opened,
            tickets_refused: self.tickets_refused - before.tickets_refused,
        }
    }
}

/// The fleet's failed attempts so far, by cause.
fn failure_causes(live: &wasmbed_loadtest::Live) -> BTreeMap<String, u64> {
    live.dial_failure_causes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

pub(super) async fn storm_run(run: Run<'_>) -> ExitCode {
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
    let pid = stack.proxies.first().map(|p| p.pid());
    let before = Seen::read(proxy_admin);
    let cpu_before = pid.and_then(cpu::cpu_seconds);
    let gateway_pids: Vec<u32> = stack.gateways.iter().map(|g| g.1.id()).collect();
    let spent_before = cpu::Snapshot::take(pid, &gateway_pids);
    let (rehomed_before, dials_before, failed_before) = (
        live.rehomed.load(Relaxed),
        live.dials.load(Relaxed),
        live.dial_failures.load(Relaxed),
    );
    let causes_before = failure_causes(live);
    say!("storm: all {devices} devices drop their connections at once and reconnect");
    let event = Instant::now();
    live.storm.cancel();
    let back = until(Duration::from_secs(120), || {
        live.rehomed.load(Relaxed) - rehomed_before >= devices
            && live.connected_now.load(Relaxed) == devices
    })
    .await;
    // Read at the moment all are back, before the fleet winds down.
    let returned = live.rehomed.load(Relaxed) - rehomed_before;
    let (crest, last) = live.wave(event, Duration::from_millis(100));
    let all_back = last.unwrap_or_else(|| event.elapsed());
    let spent = cpu::Snapshot::take(pid, &gateway_pids).since(&spent_before);
    let cpu = pid
        .and_then(cpu::cpu_seconds)
        .zip(cpu_before)
        .map(|(a, b)| a - b);
    let seen = Seen::read(proxy_admin)
        .zip(before)
        .map(|(after, before)| after.since(&before));
    let read = seen.is_some();
    let seen = seen.unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(1)).await;
    finish.cancel();
    let report = running.await.unwrap_or_default();
    let dials = live.dials.load(Relaxed) - dials_before;
    let dial_failures = live.dial_failures.load(Relaxed) - failed_before;
    let mut causes = failure_causes(live);
    for (cause, n) in causes.iter_mut() {
        *n -= causes_before.get(cause).copied().unwrap_or(0);
    }
    causes.retain(|_, n| *n > 0);
    // A handshake the proxy finished for a device that did not come back on it: wasted.
    let wasted = (seen.finished - returned as f64).max(0.0);
    say!(
        "back: {returned}/{devices} devices, the last after {:.2} s; per device (drop to WELCOME) p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; crest {crest} within 100 ms",
        all_back.as_secs_f64(),
        report.rehome_us.p50 as f64 / 1e3,
        report.rehome_us.p99 as f64 / 1e3,
        report.rehome_us.max as f64 / 1e3
    );
    say!(
        "handshakes: devices completed {dials} and failed {dial_failures}; the proxy finished {:.0} ({:.0} resumed from TLS tickets, {:.0} tickets refused), wasted {wasted:.0} ({:.1}%), refused {:?}",
        seen.finished,
        seen.tickets_opened,
        seen.tickets_refused,
        100.0 * wasted / seen.finished.max(1.0),
        seen.refused
    );
    say!("device attempts that failed, by what the device was told: {causes:?}");
    say!(
        "gateways marked down during the storm: {:.0} (every gateway stayed alive); proxy CPU {}",
        seen.downs,
        cpu.map_or("unknown".to_string(), |c| format!(
            "{c:.1} s over {:.1} s",
            all_back.as_secs_f64()
        ))
    );
    say!("over the storm, {spent}");
    say!(
        "messages: sent {} answered {} lost {}; app state restarted on {} devices",
        report.messages.sent,
        report.messages.answered,
        report.messages.lost,
        report.state_resets
    );
    say_raw!("{}", report.table());
    let checks = [
        (all_up, "every device connected before the storm"),
        (back, "every device back after the storm"),
        (report.messages.lost == 0, "no message lost"),
        (report.state_resets == 0, "no app state restarted"),
        (read, "the proxy's /metrics read before and after"),
        (seen.downs == 0.0, "no gateway marked down (none was)"),
    ];
    let doc = serde_json::json!({
        "scenario": "storm",
        "devices": devices,
        "back": returned,
        "all_back_ms": all_back.as_secs_f64() * 1e3,
        "rehome_us": report.rehome_us,
        "crest_100ms": crest,
        "device_handshakes": dials,
        "device_handshake_failures": dial_failures,
        "device_handshake_failure_causes": causes,
        "proxy_handshakes_finished": seen.finished,
        "proxy_handshakes_wasted": wasted,
        "proxy_tls_tickets_opened": seen.tickets_opened,
        "proxy_tls_tickets_refused": seen.tickets_refused,
        "refused": seen.refused,
        "gateway_downs": seen.downs,
        "proxy_cpu_s": cpu,
        "cpu_over_storm": spent,
        "lost": report.messages.lost,
        "state_resets": report.state_resets,
    });
    conclude(&checks, doc, json)
}
