//! The admin HTTP port, plain HTTP even when gRPC uses TLS (`admin_listen_addr`):
//! `GET /healthz` (200 while the process runs), `GET /readyz` (200 when ready, 503 when the
//! database does not answer or the replica drains) and `GET /metrics` (the OpenTelemetry
//! instruments in the Prometheus text format).

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::readiness::Readiness;

/// What Prometheus expects of a text exposition.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The routes of the admin port.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(readiness)
}

async fn readyz(State(readiness): State<Readiness>) -> impl IntoResponse {
    if readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else if readiness.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the database does not answer\n",
        )
    }
}

async fn metrics() -> impl IntoResponse {
    match crate::telemetry::prometheus_text() {
        Some(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
            text,
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "this process keeps no metrics for /metrics\n".to_owned(),
        ),
    }
}

/// Serves the admin port on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(readiness))
        .with_graceful_shutdown(stop)
        .await
}
