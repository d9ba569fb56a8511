//! admin: `/healthz` (alive, with the live session count), `/readyz` (503 while draining),
//! `/api/alive` (a watch held open while the process lives), `/metrics`, `/api/apps` (list,
//! upload, delete), `/api/drain`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use metrics::{counter, gauge};
use serde_json::json;

use crate::Shared;
use crate::metrics::{APPS, SESSIONS, UPLOADS};

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/alive", get(alive))
        .route("/metrics", get(metrics))
        .route("/api/apps", get(list))
        .route("/api/apps/{name}", put(upload).delete(remove))
        .route("/api/drain", post(drain))
        .layer(DefaultBodyLimit::max(shared.settings.max_app_size))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), guard))
        .with_state(shared)
}

/// Mutating requests (app upload and delete, drain) need the admin token (see
/// `wasmbed_config::admin`); refusals (401, 403, and 413 past `--max-app-size`) are counted.
async fn guard(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some((status, text)) = wasmbed_admin::refusal(&shared.settings.admin_auth, &request) {
        counter!(crate::metrics::ADMIN_REFUSED, "status" => status.to_string()).increment(1);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
        return (status, text).into_response();
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        counter!(crate::metrics::ADMIN_REFUSED, "status" => "413").increment(1);
    }
    response
}

fn status(shared: &Shared) -> serde_json::Value {
    json!({
        "status": if shared.draining.is_cancelled() { "draining" } else { "ok" },
        "gateway": shared.settings.name,
        "sessions": shared.sessions.load(Ordering::Acquire),
        "max_sessions": shared.settings.max_sessions,
    })
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(status(&shared)).into_response()
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let code = if shared.draining.is_cancelled() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, axum::Json(status(&shared))).into_response()
}

/// Most `/api/alive` watches open at once (a proxy holds one per gateway): past it, 503.
pub const MAX_ALIVE_WATCHES: usize = 256;
/// A line on an `/api/alive` watch this often, so that no middlebox drops it as idle.
const ALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

/// `/api/alive`: a response that lasts as long as the process. It sends the status line of
/// `/healthz` at once and again every 15 s, and ends cleanly (a complete chunked body) when
/// the gateway stops after its sessions. A watcher that sees it end *abruptly* (a reset, a
/// body cut short) knows the process died: its kernel closed the connection. That is how a
/// proxy finds a killed gateway at once rather than at its next failed probes, even when no
/// session's own connection would tell it (sessions on the QUIC link). Unauthenticated, as
/// `/healthz`: it says nothing more; open watches are bounded.
async fn alive(State(shared): State<Arc<Shared>>) -> Response {
    struct Watch(Arc<Shared>);
    impl Drop for Watch {
        fn drop(&mut self) {
            self.0.alive_watches.fetch_sub(1, Ordering::AcqRel);
        }
    }
    if shared.alive_watches.fetch_add(1, Ordering::AcqRel) >= MAX_ALIVE_WATCHES {
        shared.alive_watches.fetch_sub(1, Ordering::AcqRel);
        return (StatusCode::SERVICE_UNAVAILABLE, "too many watches\n").into_response();
    }
    let watch = Watch(shared);
    let lines = futures_util::stream::unfold((watch, true), |(watch, first)| async move {
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(ALIVE_EVERY) => {}
                _ = watch.0.stopped.cancelled() => return None,
            }
        } else if watch.0.stopped.is_cancelled() {
            return None;
        }
        let mut line = status(&watch.0).to_string();
        line.push('\n');
        Some((
            Ok::<_, std::convert::Infallible>(Bytes::from(line)),
            (watch, false),
        ))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    gauge!(SESSIONS).set(shared.sessions.load(Ordering::Acquire) as f64);
    gauge!(crate::metrics::MAX_SESSIONS).set(f64::from(shared.settings.max_sessions));
    gauge!(APPS).set(shared.host.list().len() as f64);
    gauge!(crate::metrics::LINKS_OPEN).set(shared.links.load(Ordering::Acquire) as f64);
    let handle = crate::metrics::handle();
    handle.run_upkeep();
    let mut text = handle.render();
    crate::metrics::render_app_calls(&mut text, &shared.host.list());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn list(State(shared): State<Arc<Shared>>) -> Response {
    let apps: Vec<_> = shared
        .host
        .list()
        .iter()
        .map(|a| json!({ "name": a.name, "bytes": a.bytes }))
        .collect();
    axum::Json(apps).into_response()
}

/// Validates and compiles the module before it replaces anything.
async fn upload(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let host = shared.clone();
    let n = name.clone();
    let compiled = tokio::task::spawn_blocking(move || host.host.compile(&n, &body)).await;
    match compiled {
        Ok(Ok(app)) => {
            let replaced = shared.host.insert(app);
            counter!(UPLOADS, "result" => "accepted").increment(1);
            tracing::info!(app = %name, replaced, "application loaded");
            let code = if replaced {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            (
                code,
                axum::Json(json!({ "name": name, "replaced": replaced })),
            )
                .into_response()
        }
        Ok(Err(e)) => {
            counter!(UPLOADS, "result" => "refused").increment(1);
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn remove(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    if shared.host.remove(&name) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            format!("no application named {name:?}\n"),
        )
            .into_response()
    }
}

async fn drain(State(shared): State<Arc<Shared>>) -> Response {
    shared.draining.cancel();
    tracing::info!("drain requested: GOAWAY to every session, no new sessions");
    (StatusCode::ACCEPTED, axum::Json(status(&shared))).into_response()
}
