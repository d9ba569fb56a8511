//! admin: the operator's HTTP endpoint, beside the data path.
//!
//! `GET /healthz` (alive), `GET /readyz` (some gateway takes sessions), `GET /metrics`
//! (Prometheus text), `GET /api/gateways` (JSON), `POST /api/gateways` (add one),
//! `POST /api/gateways/{name}/drain[?move=true]` and `/undrain`, `DELETE
//! /api/gateways/{name}`, `POST /api/reload`; the read-only dashboard: `GET /` (also
//! `/dashboard`), its assets, and its feed `GET /api/events` (Server-Sent Events).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics::counter;
use serde::Serialize;

use crate::balancer::{Gateway, GatewaySet};

/// What the admin endpoint works on: the running proxy (its gateway set, config, probes and
/// reload).
pub struct Admin {
    pub live: Arc<crate::live::Live>,
    /// Who may use POST/PUT/DELETE (`--admin-token-file`).
    pub auth: wasmbed_config::admin::AdminAuth,
    /// Sessions can move between gateways (terminate mode): `drain?move=true` is allowed.
    pub can_move: bool,
    /// The dashboard's snapshots (`/api/events`).
    pub feed: crate::dashboard::Feed,
    /// The session workers (`--threads` above 1), for `wasmbed_proxy_worker_sessions`: not
    /// kept alive by this (the stop ends them while the admin endpoint still answers).
    pub(crate) workers: Option<std::sync::Weak<crate::workers::Workers>>,
    /// Cancelled by `POST /api/shutdown`: the same stop as SIGTERM.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// The query of `POST /api/gateways/{name}/drain`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainQuery {
    /// Move the gateway's sessions to the others (terminate mode) instead of waiting for
    /// them to end.
    #[serde(rename = "move", default)]
    pub move_sessions: bool,
}

/// The body of `POST /api/gateways`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewGateway {
    pub name: String,
    pub address: String,
    pub health_address: Option<String>,
    pub weight: Option<u32>,
    pub pool: Option<String>,
}

/// One gateway as `/api/gateways` shows it.
#[derive(Debug, Serialize)]
pub struct GatewayView {
    pub name: String,
    pub address: String,
    pub pool: String,
    pub healthy: bool,
    /// It has not passed a probe yet: it takes no session until it does.
    pub awaiting_probe: bool,
    /// Takes no new session: drained here or by its own word (`drain_reported`).
    pub draining: bool,
    /// The gateway itself says it drains (its health body, or a GOAWAY).
    pub drain_reported: bool,
    pub sessions: u64,
    pub weight: u32,
    /// The count the gateway reported on its last http health probe.
    pub reported_sessions: Option<u64>,
    /// Sessions ordered to move off it (drain by moving, rebalancing) and not moved yet.
    pub moving: u64,
    /// Where it came from: `config` (the file or flags), `api`, or `dns`.
    pub origin: String,
}

impl GatewayView {
    fn of(g: &Gateway) -> GatewayView {
        GatewayView {
            name: g.name.clone(),
            address: g.addr.clone(),
            pool: g.pool.clone(),
            healthy: g.is_healthy(),
            awaiting_probe: g.is_unproven(),
            draining: g.is_draining(),
            drain_reported: g.drain_reported(),
            sessions: g.sessions(),
            weight: g.weight(),
            reported_sessions: g.reported_sessions(),
            moving: g.moving(),
            origin: match &g.origin {
                crate::balancer::Origin::Dns(source) => format!("dns {source}"),
                other => other.as_str().to_string(),
            },
        }
    }
}

pub fn router(admin: Arc<Admin>) -> Router {
    let gateways = admin.live.context().gateways.clone();
    let with_admin = Router::new()
        .route("/api/gateways", post(add))
        .route("/api/reload", post(reload))
        .route("/api/shutdown", post(shutdown))
        .route("/api/gateways/{name}/drain", post(drain))
        .route("/api/gateways/{name}/undrain", post(undrain))
        .route("/api/gateways/{name}", axum::routing::delete(remove))
        .route("/metrics", get(metrics))
        .with_state(admin.clone());
    let page = || async {
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            crate::dashboard::assets::PAGE,
        )
    };
    let asset = |kind: &'static str, body: &'static str| {
        get(move || async move {
            (
                [
                    (header::CONTENT_TYPE, kind),
                    (header::CACHE_CONTROL, "max-age=3600"),
                ],
                body,
            )
        })
    };
    let feed = admin.feed.clone();
    let dashboard = Router::new()
        .route("/", get(page))
        .route("/dashboard", get(page))
        .route(
            "/assets/dashboard.js",
            asset("text/javascript", crate::dashboard::assets::SCRIPT),
        )
        .route(
            "/assets/uplot.js",
            asset("text/javascript", crate::dashboard::assets::UPLOT_JS),
        )
        .route(
            "/assets/uplot.css",
            asset("text/css", crate::dashboard::assets::UPLOT_CSS),
        )
        .route(
            "/api/events",
            get(move || {
                let feed = feed.clone();
                async move { crate::dashboard::sse(feed) }
            }),
        );
    Router::new()
        .merge(dashboard)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/gateways", get(list))
        .with_state(gateways)
        .merge(with_admin)
        // A gateway spec is small: a larger body is refused (413) before it is read.
        .layer(axum::extract::DefaultBodyLimit::max(64 << 10))
        .layer(axum::middleware::from_fn_with_state(admin.clone(), guard))
}

/// Mutating requests need the admin token or an admin certificate (see `wasmbed_admin::refusal`);
/// refusals (401, 403, and 413 for an oversized body) are counted.
async fn guard(
    State(admin): State<Arc<Admin>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some((status, text)) = wasmbed_admin::refusal(&admin.auth, &request) {
        counter!(crate::metric_names::ADMIN_REFUSED, "status" => status.to_string()).increment(1);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
        return (status, text).into_response();
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        counter!(crate::metric_names::ADMIN_REFUSED, "status" => "413").increment(1);
    }
    response
}

async fn readyz(State(gateways): State<Arc<GatewaySet>>) -> Response {
    if gateways.is_stopping() {
        // Said from the moment the stop begins (the listeners close at the same moment: a load
        // balancer that must see 503 first needs a preStop delay, docs/deploy.md).
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response()
    } else if gateways.any_eligible() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no gateway takes sessions (none up, proven and not draining)\n",
        )
            .into_response()
    }
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    let mut text = crate::metrics::render(&admin.live.context().gateways);
    if let Some(workers) = admin.workers.as_ref().and_then(std::sync::Weak::upgrade) {
        crate::metrics::render_per_worker(&mut text, &workers.sessions());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn list(State(gateways): State<Arc<GatewaySet>>) -> Response {
    let views: Vec<_> = gateways
        .snapshot()
        .iter()
        .map(|g| GatewayView::of(g))
        .collect();
    axum::Json(views).into_response()
}

/// Adds a gateway under load: validated like the config file's, probed like the others, and
/// (with `slow_start`) ramped in.
async fn add(State(admin): State<Arc<Admin>>, body: axum::body::Bytes) -> Response {
    let bad = |m: String| (StatusCode::BAD_REQUEST, format!("{m}\n")).into_response();
    let new: NewGateway = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => {
            return bad(format!(
                "expected {{name, address, health_address?, weight?, pool?}}: {e}"
            ));
        }
    };
    // The same validation as a gateway of the config file.
    let spec = wasmbed_config::proxy::GatewaySpec {
        name: Some(new.name.clone()),
        addr: new.address,
        health_addr: new.health_address,
        weight: new.weight,
        pool: new.pool,
    };
    let config = match wasmbed_config::proxy::validate::gateway("gateway", &spec) {
        Ok(c) => c,
        Err(e) => return bad(e.to_string()),
    };
    match admin.live.add_gateway(&config) {
        Err(why) => bad(why),
        Ok(Some(g)) => {
            // A first probe before the answer, which then says whether it takes sessions.
            let health = admin.live.context().config.health.clone();
            crate::health::first_round(std::slice::from_ref(&g), &health).await;
            crate::events::event(
                "added",
                Some(&g.name),
                format!("{} added (admin API)", g.name),
            );
            tracing::info!(gateway = %g.name, address = %g.addr, "gateway added");
            (StatusCode::CREATED, axum::Json(GatewayView::of(&g))).into_response()
        }
        Ok(None) => (
            StatusCode::CONFLICT,
            format!("a gateway named {:?} exists\n", new.name),
        )
            .into_response(),
    }
}

async fn drain(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    query: axum::extract::Query<DrainQuery>,
) -> Response {
    if query.move_sessions && !admin.can_move {
        let text = "drain?move=true needs terminate mode: in passthrough the proxy cannot move a session\n";
        return (StatusCode::CONFLICT, text).into_response();
    }
    set_draining(
        &admin.live.context().gateways,
        &name,
        true,
        query.move_sessions,
    )
}

/// `POST /api/shutdown`: the stop SIGTERM begins (`/readyz` 503, listeners closed, sessions
/// handed back, then the process exits): for an orchestrator that cannot send signals. 202;
/// locked like every other change.
async fn shutdown(State(admin): State<Arc<Admin>>) -> Response {
    tracing::info!("POST /api/shutdown: shutting down");
    admin.shutdown.cancel();
    (StatusCode::ACCEPTED, "stopping\n").into_response()
}

/// `POST /api/reload`: re-reads the config file (with the start's flags) and applies the
/// difference; 200 with what changed, or 400 with the one-line reason (nothing changed).
async fn reload(State(admin): State<Arc<Admin>>) -> Response {
    let live = admin.live.clone();
    // Reading files and building TLS configs blocks: off the admin's worker.
    match tokio::task::spawn_blocking(move || live.reload()).await {
        Ok(Ok(report)) => axum::Json(report).into_response(),
        Ok(Err(e)) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reload failed: {e}\n"),
        )
            .into_response(),
    }
}

/// `DELETE /api/gateways/{name}`: out of the set at once; its sessions move (terminate mode).
async fn remove(State(admin): State<Arc<Admin>>, Path(name): Path<String>) -> Response {
    match admin.live.remove_gateway(&name) {
        Some(g) => axum::Json(GatewayView::of(&g)).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("no gateway named {name:?}\n"),
        )
            .into_response(),
    }
}

async fn undrain(State(admin): State<Arc<Admin>>, Path(name): Path<String>) -> Response {
    set_draining(&admin.live.context().gateways, &name, false, false)
}

fn set_draining(gateways: &GatewaySet, name: &str, draining: bool, move_all: bool) -> Response {
    match gateways.find(name) {
        Some(g) => {
            g.set_draining(draining);
            if !draining {
                // An operator's undrain also forgets what the gateway said of itself; if it
                // still drains, its next probe says so again.
                g.set_drain_reported(false);
            }
            // Undrain (or a plain drain) stops moves still under way.
            g.order_moves(if move_all { usize::MAX } else { 0 });
            tracing::info!(gateway = %g.name, draining, moving = move_all, sessions = g.sessions(), "drain state set");
            let (kind, text) = match (draining, move_all) {
                (true, true) => (
                    "drain",
                    format!("{} drained: its {} sessions move", g.name, g.sessions()),
                ),
                (true, false) => ("drain", format!("{} drained: no new sessions", g.name)),
                (false, _) => ("undrain", format!("{} takes sessions again", g.name)),
            };
            crate::events::event(kind, Some(&g.name), text);
            axum::Json(GatewayView::of(&g)).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            format!("no gateway named {name:?}\n"),
        )
            .into_response(),
    }
}
