//! The scenarios of `wasmbed up`: failover, drain and scale-up, each with its checks.

use super::*;

/// Waits (at most 60 s) until every device is connected; prints and returns the spread.
async fn settle(live: &wasmbed_loadtest::Live, devices: usize) -> (bool, BTreeMap<String, usize>) {
    use std::sync::atomic::Ordering::Relaxed;
    // Connected, and holding a ticket (a first REPLY and its CHECKPOINT): only then can a
    // device resume its session elsewhere.
    let all_up = until(Duration::from_secs(60), || {
        live.connected_now.load(Relaxed) == devices && live.ticketed.load(Relaxed) == devices
    })
    .await;
    let before = live.spread();
    println!(
        "spread before: {}  (max-min {})",
        spread_line(&before),
        max_minus_min(&before)
    );
    (all_up, before)
}

/// Prints the checks, writes `doc` (with the failed checks) to `json`, and gives the exit code.
fn conclude(checks: &[(bool, &str)], mut doc: serde_json::Value, json: Option<&Path>) -> ExitCode {
    let failed: Vec<&str> = checks.iter().filter(|c| !c.0).map(|c| c.1).collect();
    doc["failed_checks"] = serde_json::json!(failed);
    if let Some(path) = json
        && let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
    {
        eprintln!("wasmbed up: cannot write {}: {e}", path.display());
    }
    if failed.is_empty() {
        println!("all checks passed");
        ExitCode::SUCCESS
    } else {
        failed.iter().for_each(|f| println!("FAILED: {f}"));
        ExitCode::FAILURE
    }
}

/// A scenario's stack, fleet and output, as `up` hands them over.
pub(super) struct Run<'a> {
    pub(super) stack: &'a Stack,
    pub(super) live: &'a wasmbed_loadtest::Live,
    pub(super) devices: usize,
    pub(super) finish: CancellationToken,
    pub(super) running: tokio::task::JoinHandle<Report>,
    pub(super) json: Option<&'a Path>,
}

pub(super) async fn scenario_run(scenario: Scenario, run: Run<'_>) -> ExitCode {
    use std::sync::atomic::Ordering::Relaxed;
    let Run {
        stack,
        live,
        devices,
        finish,
        running,
        json,
    } = run;
    let (all_up, before) = settle(live, devices).await;
    let (victim, child, victim_admin) = &stack.gateways[0];
    let affected = before.get(victim).copied().unwrap_or(0);
    let rehomed_before = live.rehomed.load(Relaxed);
    let event = Instant::now();
    match scenario {
        Scenario::Failover => {
            println!("killing {victim} (SIGKILL) with {affected} devices on it");
            let _ = Command::new("kill")
                .args(["-KILL", &child.id().to_string()])
                .status();
        }
        Scenario::Drain | Scenario::ScaleUp => {
            println!("draining {victim} with {affected} devices on it");
            if let Err(e) = wasmbed_client::Admin::new(*victim_admin).post("/api/drain", b"") {
                eprintln!("wasmbed up: {e}");
            }
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
    println!(
        "spread after:  {}  (max-min {})",
        spread_line(&after),
        max_minus_min(&after)
    );
    println!(
        "re-homed {}/{affected} devices, all within {:.0} ms; re-home p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        live.rehomed.load(Relaxed) - rehomed_before,
        rehome_all.as_secs_f64() * 1e3,
        report.rehome_us.p50 as f64 / 1e3,
        report.rehome_us.p99 as f64 / 1e3,
        report.rehome_us.max as f64 / 1e3
    );
    println!(
        "messages: sent {} answered {} lost {} duplicated {}",
        report.messages.sent, report.messages.answered, lost, report.messages.duplicated
    );
    println!(
        "sessions: {} resumed from their tickets, refused {:?}; app state restarted on {} devices (state_resets)",
        report.resumed, report.resume_refused, report.state_resets
    );
    print!("{}", report.table());
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

/// What the scale-up scenario needs besides the stack.
pub(super) struct ScaleUp {
    pub(super) mode: Mode,
    pub(super) dir: PathBuf,
    pub(super) proxy_admin: SocketAddr,
    /// The second fleet, started once the new gateway is in.
    pub(super) second: LoadtestSettings,
}

/// A child process killed when dropped.
struct Killed(Child);

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
        live,
        devices,
        finish,
        running,
        json,
    } = run;
    let (all_up, before) = settle(live, devices).await;
    let index = stack.gateways.len();
    let (name, child, listen, gw_admin) = match spawn_gateway(scale.mode, &scale.dir, index, false)
    {
        Ok(g) => g,
        Err(e) => {
            eprintln!("wasmbed up: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _new_gateway = Killed(child);
    let body = format!(r#"{{"name":"{name}","address":"{listen}","health_address":"{gw_admin}"}}"#);
    let added = match wasmbed_client::Admin::new(scale.proxy_admin)
        .post("/api/gateways", body.as_bytes())
    {
        Ok(answer) => answer.status == 201,
        Err(e) => {
            eprintln!("wasmbed up: {e}");
            false
        }
    };
    println!(
        "added {name} under load: {}",
        if added {
            "accepted by the proxy"
        } else {
            "REFUSED"
        }
    );
    let second = match Fleet::prepare(scale.second) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("wasmbed up: {e}");
            return ExitCode::FAILURE;
        }
    };
    let new_devices = second.live().gateway.lock().map(|g| g.len()).unwrap_or(0);
    let live2 = second.live();
    let running2 = tokio::spawn(second.run(finish.clone()));
    println!("{new_devices} new devices dialing");
    let second_up = until(Duration::from_secs(60), || {
        live2.connected_now.load(Relaxed) == new_devices
    })
    .await;
    let new_spread = live2.spread();
    let mut after = live.spread();
    for (g, n) in &new_spread {
        *after.entry(g.clone()).or_default() += n;
    }
    println!("new sessions: {}", spread_line(&new_spread));
    println!(
        "spread after:  {}  (max-min {})",
        spread_line(&after),
        max_minus_min(&after)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    finish.cancel();
    let (r1, r2) = (
        running.await.unwrap_or_default(),
        running2.await.unwrap_or_default(),
    );
    let lost = r1.messages.lost + r2.messages.lost;
    for (reason, n) in &r2.failed {
        println!("new devices that never connected: {n} ({reason})");
    }
    println!(
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
    ];
    let doc = serde_json::json!({
        "scenario": "scale-up",
        "added": name,
        "spread_before": before,
        "new_sessions": new_spread,
        "spread_after": after,
        "lost": lost,
    });
    conclude(&checks, doc, json)
}
