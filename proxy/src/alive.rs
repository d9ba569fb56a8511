//! alive: the liveness watch. Beside its probes, the proxy holds one request open on each
//! gateway's admin address, `GET /api/alive`, which the gateway answers with a body that
//! lasts as long as its process. When the process dies its kernel closes that connection at
//! once: the body ends *abruptly* (a reset, or a chunked body cut short). The proxy then
//! checks the admin port: refused means the process is gone, and the gateway is marked down
//! at once, its sessions moving now rather than after `fall` failed probes. This matters
//! where no session's own connection would tell: sessions on the QUIC link (a dead peer
//! sends nothing), and idle ones.
//!
//! A clean end (the gateway stopping after its sessions) or a watch that cannot be held is
//! no verdict: the probes go on deciding. A hung process keeps the connection open: the
//! probes find it. A gateway without `/api/alive` (404) is not watched.

#![expect(
    clippy::disallowed_methods,
    reason = "the liveness watch runs on the probes' thread (`live::Probes::start`)"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use metrics::histogram;
use tokio_util::sync::CancellationToken;
use wasmbed_config::HealthConfig;

use crate::balancer::Gateway;
use crate::metric_names::GONE_DETECTION;

/// The gateway's path.
pub const PATH: &str = "/api/alive";
/// A watch that hears nothing for this long is reopened.
const SILENT_AFTER: Duration = Duration::from_secs(45);
/// How long opening a watch may take (connect and the answer's head). Not a probe's
/// deadline: a gateway busy with a connect storm answers late and is still alive, and a
/// watch given up leaves a gap until the next try.
const OPEN_WITHIN: Duration = Duration::from_secs(5);

/// How a watch ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// Not held: no connection, no answer in time, or a status other than 200.
    NotHeld,
    /// The gateway has no such endpoint (404, 405): stop watching it.
    Unsupported,
    /// The body completed: the gateway stopped in order.
    Clean,
    /// The connection broke mid-body.
    Abrupt,
}

/// Watches `gateway` (which has a health address) until `stop` or its removal.
pub async fn watch(gateway: Arc<Gateway>, config: HealthConfig, stop: CancellationToken) {
    let Some(addr) = gateway.health_addr.clone() else {
        return;
    };
    loop {
        let ended = tokio::select! {
            e = hold(&addr, OPEN_WITHIN) => e,
            _ = stop.cancelled() => return,
            _ = gateway.removed() => return,
        };
        match ended {
            Ended::Unsupported => {
                tracing::debug!(gateway = %gateway.name, "no {PATH} on the gateway: probes alone watch it");
                return;
            }
            Ended::Abrupt => {
                let cut = Instant::now();
                if gone(&addr, config.timeout).await {
                    let change = gateway.observe_gone(config.fall);
                    if change.is_some() {
                        histogram!(GONE_DETECTION).record(cut.elapsed().as_secs_f64());
                    }
                    crate::health::report(
                        &gateway,
                        change,
                        "its process is gone (its liveness watch was cut and its admin port refuses)",
                    );
                } else {
                    // Alive after all (a network blip, an admin restart): probe now.
                    gateway.suspect();
                }
            }
            Ended::Clean | Ended::NotHeld => {}
        }
        // Watch again after an interval (the probes decide meanwhile).
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = stop.cancelled() => return,
            _ = gateway.removed() => return,
        }
    }
}

/// Holds `GET /api/alive` on `addr` until its body ends.
async fn hold(addr: &str, timeout: Duration) -> Ended {
    let opened = tokio::time::timeout(timeout, async {
        let stream = crate::dial::tcp(addr, tokio::time::sleep).await.ok()?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        let driver = tokio::spawn(conn);
        let request = hyper::Request::get(PATH)
            .header(hyper::header::HOST, addr)
            .body(Empty::<Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok();
        Some((response, driver))
    })
    .await;
    let Ok(Some((response, driver))) = opened else {
        return Ended::NotHeld;
    };
    let ended = match response {
        None => Ended::NotHeld,
        Some(r) if matches!(r.status().as_u16(), 404 | 405) => Ended::Unsupported,
        Some(r) if r.status() != hyper::StatusCode::OK => Ended::NotHeld,
        Some(r) => {
            let mut body = r.into_body();
            loop {
                // The gateway sends a line every 15 s: three missed, and the watch is reopened
                // (a silent partition sends no reset; the probes judge the gateway meanwhile).
                match tokio::time::timeout(SILENT_AFTER, body.frame()).await {
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(_))) => break Ended::Abrupt,
                    Ok(None) => break Ended::Clean,
                    Err(_) => break Ended::NotHeld,
                }
            }
        }
    };
    driver.abort();
    ended
}

/// Whether the gateway's process is gone after its watch was cut: its admin port refuses
/// within [`GONE_WITHIN`]. A dying process's kernel closes its sockets one after another, so
/// the watch's connection may end a moment before the listener does: the port is tried
/// again every [`GONE_RETRY`] until then. A port that keeps answering proves it alive.
async fn gone(addr: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + GONE_WITHIN;
    loop {
        if refused(addr, timeout).await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(GONE_RETRY).await;
    }
}

/// How long a cut watch's gateway may take to close its admin port (see [`gone`]).
const GONE_WITHIN: Duration = Duration::from_millis(200);
const GONE_RETRY: Duration = Duration::from_millis(5);

/// Whether a connect to `addr` is refused (nothing listens: the process is gone). A connect
/// that succeeds or times out proves nothing.
async fn refused(addr: &str, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, crate::dial::tcp(addr, tokio::time::sleep)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}
