//! The HTTP surface: `POST /webhook`, `GET /metrics`, `/healthz`, `/readyz`.

mod budget;
mod health;
mod serve;
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

pub use budget::BodyBudget;
pub use serve::{serve, IntakeLimits};
pub use webhook::{MAX_BODY_BYTES, WEBHOOK_DEADLINE};

/// Everything a handler may touch.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub ingest: Ingest,
    pub profiles: ProfileCache,
    pub metrics: Arc<Metrics>,
    /// Every delivery is verified against these: there is no "no secret"
    /// mode (`--simulate` makes one up and signs with it).
    pub secrets: WebhookSecrets,
    /// Bytes of webhook bodies held at once, over all requests.
    pub body_budget: BodyBudget,
    /// How long a webhook body may take to arrive.
    pub body_read_timeout: Duration,
    /// Wakes the reconciler after demand changed.
    pub wake: Arc<Notify>,
    /// Scopes learned from verified deliveries, shared with the reconciler.
    pub scopes: spot_runners_domain::scopes::KnownScopes,
    /// Closed past the daily spend cap: provisioning launches nothing new.
    pub spend_gate: crate::spend::SpendGate,
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
    #[error("webhook body not received within {0:?}")]
    BodyTimeout(Duration),
    /// Too many bodies are being read at once (the shared budget is spent).
    #[error("too many deliveries in flight; retry later")]
    Busy,
    /// The detail is logged, never sent: it may be a database's error text.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadSignature => StatusCode::UNAUTHORIZED,
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Busy | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// What the caller is told: everything but internal detail.
    fn public_message(&self) -> String {
        match self {
            ApiError::Unavailable(_) => {
                "the ledger could not be written; the delivery was not recorded".into()
            }
            other => other.to_string(),
        }
    }

    /// The `outcome` label of `spot_runners_webhooks_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ApiError::BadSignature => "bad_signature",
            ApiError::Malformed(_) | ApiError::BodyTimeout(_) => "malformed",
            ApiError::TooLarge => "too_large",
            ApiError::Busy | ApiError::Unavailable(_) => "unavailable",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (
            self.status(),
            Json(serde_json::json!({ "error": self.public_message() })),
        )
            .into_response();
        if matches!(self, ApiError::Unavailable(_) | ApiError::Busy) {
            // GitHub does not retry on its own, but an operator's tooling may.
            res.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
        }
        res
    }
}
