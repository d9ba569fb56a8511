//! admin: the operator's HTTP endpoint, beside the data path.
//!
//! `GET /healthz` (alive), `GET /readyz` (some gateway takes sessions), `GET /metrics`
//! (Prometheus text), `GET /api/gateways` (JSON), `POST /api/gateways/{name}/drain` and
//! `/undrain`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::balancer::{Gateway, GatewaySet};

/// One gateway as `/api/gateways` shows it.
#[derive(Debug, Serialize)]
pub struct GatewayView {
    pub name: String,
    pub address: String,
    pub pool: String,
    pub healthy: bool,
    pub draining: bool,
    pub sessions: u64,
    pub weight: u32,
    /// The count the gateway reported on its last http health probe.
    pub reported_sessions: Option<u64>,
}

impl GatewayView {
    fn of(g: &Gateway) -> GatewayView {
        GatewayView {
            name: g.name.clone(),
            address: g.addr.clone(),
            pool: g.pool.clone(),
            healthy: g.is_healthy(),
            draining: g.is_draining(),
            sessions: g.sessions(),
            weight: g.weight(),
            reported_sessions: g.reported_sessions(),
        }
    }
}

pub fn router(gateways: Arc<GatewaySet>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/gateways", get(list))
        .route("/api/gateways/{name}/drain", post(drain))
        .route("/api/gateways/{name}/undrain", post(undrain))
        .with_state(gateways)
}

/// Serves the admin endpoint until `shutdown`.
pub async fn serve(listener: TcpListener, gateways: Arc<GatewaySet>, shutdown: CancellationToken) {
    let result = axum::serve(listener, router(gateways))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}

async fn readyz(State(gateways): State<Arc<GatewaySet>>) -> Response {
    if gateways.any_eligible() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no gateway is up\n").into_response()
    }
}

async fn metrics(State(gateways): State<Arc<GatewaySet>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&gateways),
    )
        .into_response()
}

async fn list(State(gateways): State<Arc<GatewaySet>>) -> Response {
    let views: Vec<_> = gateways
        .snapshot()
        .iter()
        .map(|g| GatewayView::of(g))
        .collect();
    axum::Json(views).into_response()
}

async fn drain(state: State<Arc<GatewaySet>>, name: Path<String>) -> Response {
    set_draining(state, name, true)
}

async fn undrain(state: State<Arc<GatewaySet>>, name: Path<String>) -> Response {
    set_draining(state, name, false)
}

fn set_draining(
    State(gateways): State<Arc<GatewaySet>>,
    Path(name): Path<String>,
    draining: bool,
) -> Response {
    match gateways.find(&name) {
        Some(g) => {
            g.set_draining(draining);
            tracing::info!(gateway = %g.name, draining, sessions = g.sessions(), "drain state set");
            axum::Json(GatewayView::of(&g)).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            format!("no gateway named {name:?}\n"),
        )
            .into_response(),
    }
}
