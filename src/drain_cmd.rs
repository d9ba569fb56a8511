//! `wasmbed drain`: drains a gateway before it stops (a Kubernetes `preStop` hook; the
//! runtime image has no shell, so the hook runs the binary itself).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    /// The gateway's admin endpoint.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9101")]
    admin: SocketAddr,
    /// The file holding the gateway's admin token (its --admin-token-file), when it has one.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// How long to wait for the gateway's sessions to leave before returning anyway (keep it
    /// under the pod's terminationGracePeriodSeconds).
    #[arg(long, value_name = "DURATION", default_value = "25s")]
    wait: humantime::Duration,
}

/// POST /api/drain: the gateway stops taking sessions, reports not ready, and sends GOAWAY
/// to each session (with its final checkpoint): a terminating proxy moves them to other
/// gateways, app state along. Then waits until the gateway has no session left.
pub fn run(a: &DrainArgs) -> ExitCode {
    let mut admin = wasmbed_client::Admin::new(a.admin);
    if let Some(path) = &a.token_file {
        match std::fs::read_to_string(path) {
            Ok(token) => admin = admin.with_token(token.trim()),
            Err(e) => return fail(format!("cannot read {}: {e}", path.display())),
        }
    }
    match admin.post("/api/drain", b"") {
        Ok(answer) if answer.status == 200 || answer.status == 202 => {}
        Ok(answer) => {
            return fail(format!(
                "POST /api/drain: {} {}",
                answer.status,
                answer.body.trim()
            ));
        }
        Err(e) => return fail(e),
    }
    let deadline = Instant::now() + Duration::from(a.wait);
    loop {
        let sessions = admin
            .get("/readyz")
            .ok()
            .and_then(|answer| serde_json::from_str::<serde_json::Value>(&answer.body).ok())
            .and_then(|status| status["sessions"].as_u64());
        match sessions {
            Some(0) => {
                say!("drained: no session left on {}", a.admin);
                return ExitCode::SUCCESS;
            }
            // Gone already (it stopped once empty): drained too.
            None if admin.get("/healthz").is_err() => {
                say!("drained: {} has stopped", a.admin);
                return ExitCode::SUCCESS;
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            say!(
                "still {} sessions on {} after {}; stopping anyway",
                sessions.map_or("some".into(), |n| n.to_string()),
                a.admin,
                a.wait
            );
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    esay!("wasmbed drain: {e}");
    ExitCode::from(2)
}
