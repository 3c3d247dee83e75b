//! The HTTP surface: `POST /webhook`, `GET /metrics`, `/healthz`, `/readyz`.

mod health;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use spot_runners_domain::webhook::WebhookSecrets;
use spot_runners_store::Store;
use tokio::sync::Notify;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::profiles::ProfileCache;

pub use webhook::{MAX_BODY_BYTES, WEBHOOK_DEADLINE};

/// Everything a handler may touch.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub ingest: Ingest,
    pub profiles: ProfileCache,
    pub metrics: Arc<Metrics>,
    /// `None` only under `--simulate`, where the simulator signs nothing.
    pub secrets: Option<WebhookSecrets>,
    /// Wakes the reconciler after demand changed.
    pub wake: Arc<Notify>,
}

/// Everything on one listener: webhooks, health and metrics.
pub fn router(state: AppState) -> Router {
    public_router(state, true)
}

/// The public listener (GitHub must reach `/webhook`): `/metrics` only
/// when no separate metrics listener is configured.
pub fn public_router(state: AppState, with_metrics: bool) -> Router {
    let mut routes = Router::new().route("/webhook", post(webhook::receive));
    if with_metrics {
        routes = routes.route("/metrics", get(health::metrics));
    }
    layered(
        routes
            .route("/healthz", get(health::healthz))
            .route("/readyz", get(health::readyz))
            .with_state(state),
    )
}

/// `SPOT_RUNNERS_METRICS_LISTEN`: metrics and health, for Prometheus and
/// probes on an address the internet cannot reach.
pub fn metrics_router(state: AppState) -> Router {
    layered(
        Router::new()
            .route("/metrics", get(health::metrics))
            .route("/healthz", get(health::healthz))
            .route("/readyz", get(health::readyz))
            .with_state(state),
    )
}

fn layered(routes: Router) -> Router {
    routes
        .layer(CatchPanicLayer::new())
        // GitHub gives a receiver 10 s; past that an answer is useless.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(10),
        ))
        .layer(TraceLayer::new_for_http())
}

/// Every way a request can fail, and the one place each maps to a status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong X-Hub-Signature-256")]
    BadSignature,
    #[error("malformed delivery: {0}")]
    Malformed(String),
    #[error("body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadSignature => StatusCode::UNAUTHORIZED,
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `outcome` label of `spot_runners_webhooks_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ApiError::BadSignature => "bad_signature",
            ApiError::Malformed(_) => "malformed",
            ApiError::TooLarge => "too_large",
            ApiError::Unavailable(_) => "unavailable",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (
            self.status(),
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        if matches!(self, ApiError::Unavailable(_)) {
            // GitHub does not retry on its own, but an operator's tooling may.
            res.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
        }
        res
    }
}
