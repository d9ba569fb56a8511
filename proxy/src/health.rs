//! health: one task per gateway probes it on a jittered interval (tcp, tls or http) and flips
//! it up after `rise` successes or down after `fall` failures. Down cancels its sessions.
//! Draining is not down: a gateway whose health body says `"status": "draining"` (its
//! `/healthz` 200 or its `/readyz` 503 alike) is alive and takes no new session; its sessions
//! finish (passthrough) or move with their answers (terminate). A gateway waits for its first
//! passed probe before it takes a session, however it was added.

#![expect(
    clippy::disallowed_methods,
    reason = "the probes run on the probes' thread; the first round there (`first_round_on`) or on the admin thread (an added gateway's)"
)]

use std::sync::Arc;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmbed_config::{HealthCheck, HealthConfig};

use crate::balancer::{Counts, Gateway, Transition};

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("http: {0}")]
    Http(String),
    #[error("http status {0}")]
    Status(u16),
}

/// What a passed probe says of a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It answers (tcp, tls): nothing said of draining.
    Alive,
    /// Serving (http body without `"status": "draining"`).
    Serving,
    /// Alive and draining (http body `"status": "draining"`): no new sessions.
    Draining,
}

/// The probe kind a gateway gets under `check`.
pub fn kind_for(check: HealthCheck, gateway: &Gateway) -> HealthCheck {
    match check {
        HealthCheck::Auto if gateway.health_addr.is_some() => HealthCheck::Http,
        HealthCheck::Auto => HealthCheck::Tcp,
        other => other,
    }
}

/// Starts one probe loop per gateway; they stop on `shutdown`.
pub fn spawn(
    gateways: &[Arc<Gateway>],
    config: &HealthConfig,
    (tracker, on): (&TaskTracker, &tokio::runtime::Handle),
    shutdown: &CancellationToken,
) {
    for gateway in gateways {
        let kind = kind_for(config.check, gateway);
        if kind == HealthCheck::None {
            // No prober: taken on trust (one down or unproven when a reload turned the
            // checks off would stay so for good).
            report(gateway, gateway.take_on_trust(), "health checks are off");
            continue;
        }
        let (g, c, s) = (gateway.clone(), config.clone(), shutdown.clone());
        tracker.spawn_on(async move { watch(g, kind, c, s).await }, on);
    }
}

async fn watch(
    gateway: Arc<Gateway>,
    kind: HealthCheck,
    config: HealthConfig,
    stop: CancellationToken,
) {
    // Since when a session's read counts as the gateway running: the previous probe's start
    // (a probe's own window alone is too short when the host starves the gateway's process
    // for a moment; a hung gateway is still found one probe later).
    let mut heard_window = std::time::Instant::now();
    loop {
        let started = std::time::Instant::now();
        let result = tokio::select! {
            r = tokio::time::timeout(config.timeout, probe(&gateway, kind, &config.path)) => r,
            _ = stop.cancelled() => return,
            _ = gateway.removed() => return,
        };
        let result = result.unwrap_or(Err(ProbeError::Timeout));
        // A probe that timed out while the gateway's sessions were reading what its process
        // sent (since the previous probe began) says the host is busy, not that the gateway
        // is dead or hung: no verdict. (On a saturated host, a connect storm made probes time
        // out and healthy gateways be marked down, so new sessions skipped them and the exact
        // balance broke.) A hung or dead gateway sends nothing, and its timeouts count.
        let busy = matches!(result, Err(ProbeError::Timeout)) && gateway.heard_since(heard_window);
        heard_window = started;
        judge(&gateway, (kind, result), busy, &config);
        // Up to 10% jitter keeps the probes of many proxies from beating in step. Errors
        // seen by sessions (`suspect`) bring the next probe forward, as HAProxy's `observe
        // layer4` with `on-error fastinter` does, but never closer than a quarter interval
        // after this one: a storm of errors cannot turn the prober into a flood.
        let jitter = config.interval.mul_f64(fastrand::f64() * 0.1);
        let fast = tokio::time::sleep(config.interval / 4);
        tokio::select! {
            _ = tokio::time::sleep(config.interval - jitter) => {}
            _ = async { gateway.suspected().await; fast.await } => {
                tracing::debug!(gateway = %gateway.name, "errors seen: probing now");
            }
            _ = stop.cancelled() => return,
            _ = gateway.removed() => return,
        }
    }
}

/// Applies one probe result to `gateway`: what it says of draining, then (unless `busy`, or a
/// refused connect that is its drain) one health observation.
fn judge(
    gateway: &Gateway,
    (kind, result): (HealthCheck, Result<Verdict, ProbeError>),
    busy: bool,
    config: &HealthConfig,
) {
    if let Err(e) = &result {
        Counts::bump(&gateway.counts.probe_failures);
        tracing::debug!(gateway = %gateway.name, error = %e, busy, "health probe failed");
    }
    match result {
        Ok(Verdict::Draining) => note_drain(gateway, true, "its health body"),
        Ok(Verdict::Serving) => note_drain(gateway, false, "its health body"),
        _ => {}
    }
    // A refused connect to the data address (the listener a drain closes); an http probe's
    // admin address stays open through a drain, so its refusal is the process gone.
    let data_address = kind != HealthCheck::Http || gateway.health_addr.is_none();
    let its_drain = data_address
        && matches!(&result, Err(ProbeError::Connect(e)) if gateway.refusal_is_its_drain(e));
    if busy || its_drain {
        return;
    }
    let reason = result.as_ref().err().map(ToString::to_string);
    let change = gateway.observe(result.is_ok(), config.rise, config.fall);
    report(
        gateway,
        change,
        reason.as_deref().unwrap_or("probe succeeded"),
    );
}

/// Records that `gateway` says it drains (or serves again), from `source`; logs a change.
pub fn note_drain(gateway: &Gateway, draining: bool, source: &str) {
    if !gateway.set_drain_reported(draining) {
        return;
    }
    let text = if draining {
        format!(
            "{} says it is draining ({source}): no new sessions; its sessions finish",
            gateway.name
        )
    } else {
        format!("{} serves again ({source})", gateway.name)
    };
    let to = if draining { "draining" } else { "serving" };
    crate::events::event(to, Some(&gateway.name), text.clone());
    tracing::info!(gateway = %gateway.name, sessions = gateway.sessions(), "{text}");
}

/// Probes every gateway that awaits its first probe once, at the same time (each bounded by
/// the probe timeout), and applies the results: what `Proxy::bind` does before the proxy
/// says it is ready, and the admin API before it answers an add.
pub async fn first_round(gateways: &[Arc<Gateway>], config: &HealthConfig) {
    let probes = gateways.iter().filter(|g| g.is_unproven()).map(|g| {
        let kind = kind_for(config.check, g);
        async move {
            if kind == HealthCheck::None {
                return;
            }
            let result = tokio::time::timeout(config.timeout, probe(g, kind, &config.path))
                .await
                .unwrap_or(Err(ProbeError::Timeout));
            judge(g, (kind, result), false, config);
        }
    });
    futures_util::future::join_all(probes).await;
}

/// [`first_round`] on the control thread `on` (the probes'), for the data plane: its bounds
/// are timers, which a passthrough data plane has no driver for
/// ([`crate::deadlines::data_plane_timers`]). Returns when the round is done, or the thread
/// stopped under it (the gateways then wait for their probes, as they would).
pub(crate) async fn first_round_on(
    on: &tokio::runtime::Handle,
    gateways: Arc<Vec<Arc<Gateway>>>,
    config: HealthConfig,
) {
    let round = on.spawn(async move { first_round(&gateways, &config).await });
    if let Err(e) = round.await {
        tracing::warn!(error = %e, "health: the first probe round did not finish");
    }
}

/// Logs and counts a health transition, whoever observed it (probe or failed connect).
pub fn report(gateway: &Gateway, change: Option<Transition>, why: &str) {
    let Some(change) = change else { return };
    let (to, count) = match change {
        Transition::Up => ("up", &gateway.counts.went_up),
        Transition::Down => ("down", &gateway.counts.went_down),
    };
    Counts::bump(count);
    crate::events::event(
        to,
        Some(&gateway.name),
        format!("{} is {to}: {why}", gateway.name),
    );
    match change {
        Transition::Up => tracing::info!(gateway = %gateway.name, why, "gateway is up"),
        Transition::Down => tracing::warn!(
            gateway = %gateway.name,
            sessions = gateway.sessions(),
            why,
            "gateway is down; closing its sessions"
        ),
    }
}

/// One probe of one gateway.
pub async fn probe(
    gateway: &Gateway,
    kind: HealthCheck,
    path: &str,
) -> Result<Verdict, ProbeError> {
    match kind {
        HealthCheck::Tcp | HealthCheck::Auto => {
            connect(&gateway.addr).await.map(|_| Verdict::Alive)
        }
        HealthCheck::Tls => tls(&gateway.addr).await.map(|()| Verdict::Alive),
        HealthCheck::Http => {
            let addr = gateway.health_addr.as_deref().unwrap_or(&gateway.addr);
            let body = http(addr, path).await?;
            gateway.set_reported_sessions(body.sessions);
            gateway.set_reported_capacity(body.capacity);
            Ok(body.verdict)
        }
        HealthCheck::None => Ok(Verdict::Alive),
    }
}

/// What an http health answer says.
struct HealthBody {
    sessions: Option<u64>,
    capacity: Option<u64>,
    verdict: Verdict,
}

async fn connect(addr: &str) -> Result<TcpStream, ProbeError> {
    // A name's addresses raced, as sessions reach them ([`crate::dial`]).
    let stream = crate::dial::tcp(addr, tokio::time::sleep)
        .await
        .map_err(ProbeError::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn tls(addr: &str) -> Result<(), ProbeError> {
    let stream = connect(addr).await?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("gateway").expect("static valid name"));
    let connector = tokio_rustls::TlsConnector::from(wasmbed_certs::probe_client_config());
    connector
        .connect(name, stream)
        .await
        .map(drop)
        .map_err(ProbeError::Tls)
}

/// `GET path`: 200 passes; 200 or 503 whose body says `"status": "draining"` passes as
/// draining; anything else fails. The body's session count and capacity (`max_sessions`)
/// are kept where it reports them.
async fn http(addr: &str, path: &str) -> Result<HealthBody, ProbeError> {
    let stream = connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProbeError::Http(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr)
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ProbeError::Http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| ProbeError::Http(e.to_string()));
    let result = match response {
        Ok(r) => {
            let status = r.status();
            let body = Limited::new(r.into_body(), 4096).collect().await;
            let body = body.map(|b| b.to_bytes()).unwrap_or_default();
            let draining = draining_in(&body);
            match status {
                hyper::StatusCode::OK | hyper::StatusCode::SERVICE_UNAVAILABLE
                    if draining || status == hyper::StatusCode::OK =>
                {
                    Ok(HealthBody {
                        sessions: sessions_in(&body),
                        capacity: capacity_in(&body),
                        verdict: if draining {
                            Verdict::Draining
                        } else {
                            Verdict::Serving
                        },
                    })
                }
                other => Err(ProbeError::Status(other.as_u16())),
            }
        }
        Err(e) => Err(e),
    };
    driver.abort();
    result
}

/// Whether a health body says the gateway drains: JSON `{"status": "draining"}`.
pub fn draining_in(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("status")?.as_str().map(|s| s == "draining"))
        .unwrap_or(false)
}

/// Finds a gateway's capacity in a health body: JSON `{"max_sessions": N}`.
pub fn capacity_in(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("max_sessions")?
        .as_u64()
}

/// Finds a live session count in a health body: JSON `{"sessions": N}`, or a text line
/// `sessions N` / `sessions: N` / `sessions=N`.
pub fn sessions_in(body: &[u8]) -> Option<u64> {
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        return json.get("sessions").and_then(serde_json::Value::as_u64);
    }
    let text = std::str::from_utf8(body).ok()?;
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("sessions")?;
        rest.trim_start_matches([':', '=', ' ']).trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_counts_are_read_from_json_or_text() {
        assert_eq!(sessions_in(br#"{"status":"ok","sessions":17}"#), Some(17));
        assert_eq!(sessions_in(b"ok\nsessions: 5\n"), Some(5));
        assert_eq!(sessions_in(b"sessions=9"), Some(9));
        assert_eq!(sessions_in(b"ok"), None);
        assert_eq!(sessions_in(br#"{"sessions":-1}"#), None);
        assert_eq!(sessions_in(&[0xff, 0xfe]), None);
        assert_eq!(
            capacity_in(br#"{"sessions":1,"max_sessions":500}"#),
            Some(500)
        );
        assert_eq!(capacity_in(b"sessions: 5"), None);
    }
}
