//! `POST /webhook`: verify, parse, match, record durably, answer.
//! Nothing here calls GitHub or AWS: the reconciler acts on the ledger.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::BytesMut;
use http_body_util::BodyExt;
use spot_runners_domain::job::ParsedWorkflowJob;
use spot_runners_domain::run::{ParsedWorkflowRun, WorkflowRunEvent};
use spot_runners_domain::webhook::Signature;
use spot_runners_domain::{JobStatus, WorkflowJobEvent};
use spot_runners_store::{DeliveryOutcome, IncomingDelivery};
use tokio::time::Instant;

use super::budget::Reservation;
use super::{ApiError, AppState};
use crate::ingest::IngestError;

/// GitHub caps payloads at 25 MB.
pub const MAX_BODY_BYTES: usize = 25 * 1024 * 1024;
/// A delivery that cannot be committed within this is answered 503 (GitHub
/// waits 10 s).
pub const WEBHOOK_DEADLINE: Duration = Duration::from_secs(5);
/// Bodies larger than this are verified on a blocking thread.
const VERIFY_INLINE_BYTES: usize = 256 * 1024;
/// Longest `X-GitHub-Delivery` accepted (GitHub sends a 36-character GUID).
const MAX_DELIVERY_ID: usize = 128;

/// What a successful delivery came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accepted {
    Ping,
    Recorded,
    Duplicate,
    Ignored,
}

impl Accepted {
    fn outcome(self) -> &'static str {
        match self {
            Accepted::Ping | Accepted::Recorded => "accepted",
            Accepted::Duplicate => "duplicate",
            Accepted::Ignored => "ignored",
        }
    }
}

impl IntoResponse for Accepted {
    fn into_response(self) -> Response {
        let status = match self {
            Accepted::Ping => StatusCode::OK,
            _ => StatusCode::ACCEPTED,
        };
        let outcome = if self == Accepted::Ping {
            "pong"
        } else {
            self.outcome()
        };
        (status, Json(serde_json::json!({ "outcome": outcome }))).into_response()
    }
}

/// What the log line and the metric say about a delivery.
#[derive(Default)]
struct Delivery {
    id: Option<String>,
    event: String,
    action: String,
    job_id: Option<i64>,
}

impl Delivery {
    fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            id: text("x-github-delivery"),
            event: text("x-github-event").unwrap_or_default(),
            ..Self::default()
        }
    }

    /// Metric labels stay bounded whatever a sender puts in headers.
    fn event_label(&self) -> &'static str {
        match self.event.as_str() {
            "workflow_job" => "workflow_job",
            "workflow_run" => "workflow_run",
            "ping" => "ping",
            "" => "none",
            _ => "other",
        }
    }

    fn action_label(&self) -> &'static str {
        match self.action.as_str() {
            "" => "",
            a => JobStatus::parse(a).map_or("other", JobStatus::as_str),
        }
    }
}

#[tracing::instrument(name = "webhook", skip_all)]
pub async fn receive(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let deadline = started + WEBHOOK_DEADLINE;
    let mut delivery = Delivery::from_headers(&headers);
    let result = handle(&state, &headers, body, &mut delivery, deadline).await;
    let outcome = match &result {
        Ok(a) => a.outcome(),
        Err(e) => e.outcome(),
    };
    state
        .metrics
        .webhooks_total
        .with_label_values(&[delivery.event_label(), delivery.action_label(), outcome])
        .inc();
    state
        .metrics
        .webhook_ack_seconds
        .observe(started.elapsed().as_secs_f64());
    let id = delivery.id.as_deref().unwrap_or("");
    match &result {
        Ok(_) => tracing::info!(
            delivery = id, event = %delivery.event, action = %delivery.action,
            job_id = delivery.job_id, outcome, "webhook delivery"
        ),
        Err(e) => tracing::warn!(
            delivery = id, event = %delivery.event, action = %delivery.action,
            job_id = delivery.job_id, outcome, error = %e, "webhook delivery rejected"
        ),
    }
    match result {
        Ok(a) => a.into_response(),
        Err(e) => e.into_response(),
    }
}

/// Reads the body within the shared budget and the body read timeout. The
/// bytes stay reserved in `held` until the caller drops it.
async fn read_body(
    state: &AppState,
    declared: Option<usize>,
    body: Body,
    held: &mut Reservation,
) -> Result<Bytes, ApiError> {
    let budget = &state.body_budget;
    // A declared length is reserved whole before anything is read, so a
    // full budget costs the sender nothing but this answer.
    if !budget.grow(held, declared.unwrap_or(0)) {
        return Err(ApiError::Busy);
    }
    let read = async {
        let mut body = body;
        let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::Malformed(format!("reading the body: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let len = buf.len() + data.len();
            if len > MAX_BODY_BYTES {
                return Err(ApiError::TooLarge);
            }
            if len > held.bytes() && !budget.grow(held, len - held.bytes()) {
                return Err(ApiError::Busy);
            }
            buf.extend_from_slice(&data);
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(state.body_read_timeout, read)
        .await
        .map_err(|_| ApiError::BodyTimeout(state.body_read_timeout))?
}

async fn handle(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    delivery: &mut Delivery,
    deadline: Instant,
) -> Result<Accepted, ApiError> {
    // Everything the head decides is decided before a byte of the body is
    // read: a stranger's body costs memory only once it carries a
    // well-formed signature for an event the service uses.
    match delivery.event.as_str() {
        "ping" | "workflow_job" | "workflow_run" => {}
        "" => return Err(ApiError::Malformed("missing X-GitHub-Event".into())),
        _ => return Ok(Accepted::Ignored),
    }
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .and_then(Signature::parse)
        .ok_or(ApiError::BadSignature)?;
    let declared = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| ApiError::Malformed("bad Content-Length".into()))?,
        ),
    };
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(ApiError::TooLarge);
    }
    let mut held = Reservation::default();
    let body = read_body(state, declared, body, &mut held).await?;
    let verified = if body.len() > VERIFY_INLINE_BYTES {
        // Hashing 25 MiB takes a while; off the runtime's threads, so the
        // deliveries beside it are not held up.
        let (secrets, body) = (state.secrets.clone(), body.clone());
        tokio::task::spawn_blocking(move || secrets.verify_signature(&signature, &body))
            .await
            .unwrap_or(false)
    } else {
        state.secrets.verify_signature(&signature, &body)
    };
    if !verified {
        return Err(ApiError::BadSignature);
    }
    // Only a caller who proved it holds the secret learns more than 401.
    // `workflow_job` and `workflow_run` are recorded by their delivery GUID.
    let job_delivery_id = if delivery.event != "ping" {
        let is_json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|ct| ct.starts_with("application/json"));
        if !is_json {
            return Err(ApiError::Malformed(
                "content type must be application/json (set it in the webhook's settings)".into(),
            ));
        }
        match delivery.id.as_deref().map(str::trim) {
            Some(id) if !id.is_empty() && id.len() <= MAX_DELIVERY_ID => Some(id.to_owned()),
            _ => {
                return Err(ApiError::Malformed(
                    "missing or oversized X-GitHub-Delivery".into(),
                ))
            }
        }
    } else {
        None
    };
    let Some(id) = job_delivery_id else {
        // An org webhook's ping names the org: warm pools and orphan
        // sweeps can start there before its first job.
        if let Some(scope) = spot_runners_domain::scopes::scope_of_delivery(&body) {
            if state.scopes.learn(scope.clone()) {
                tracing::info!(%scope, "serving a scope named by a webhook ping");
            }
        }
        return Ok(Accepted::Ping);
    };
    if delivery.event == "workflow_run" {
        return record_run(state, &body, id, delivery, deadline).await;
    }
    let job =
        match WorkflowJobEvent::parse(&body).map_err(|e| ApiError::Malformed(e.to_string()))? {
            ParsedWorkflowJob::Event(job) => *job,
            ParsedWorkflowJob::IgnoredAction(action) => {
                delivery.action = action;
                return Ok(Accepted::Ignored);
            }
        };
    // The parsed job is all that is kept; the body's bytes go back to the
    // budget before the (possibly slow) commit.
    drop(body);
    drop(held);
    delivery.action = job.status.as_str().to_owned();
    delivery.job_id = Some(job.job_id);
    state.scopes.learn(match &job.org {
        Some(org) => spot_runners_domain::ports::RunnerScope::Org(org.clone()),
        None => spot_runners_domain::ports::RunnerScope::Repo(job.repository.clone()),
    });
    let profile = state.profiles.match_job(&job.labels, &job.repository);
    let wait = match (job.status, &profile, job.created_at, job.started_at) {
        (JobStatus::InProgress, Ok(p), Some(created), Some(started)) => {
            Some((p.clone(), (started - created).num_milliseconds()))
        }
        _ => None,
    };
    let incoming = IncomingDelivery {
        delivery_id: id,
        job,
        profile,
    };
    let outcome = state
        .ingest
        .record(incoming, deadline)
        .await
        .map_err(|e: IngestError| ApiError::Unavailable(e.to_string()))?;
    match outcome {
        DeliveryOutcome::Duplicate => Ok(Accepted::Duplicate),
        DeliveryOutcome::Accepted => {
            if let Some((profile, ms)) = wait {
                // GitHub's own clock on both ends, so a late delivery does
                // not stretch the figure.
                state
                    .metrics
                    .job_wait_seconds
                    .with_label_values(&[&profile])
                    .observe(ms.max(0) as f64 / 1000.0);
            }
            state.wake.notify_one();
            Ok(Accepted::Recorded)
        }
    }
}

/// A `workflow_run` delivery: `completed` tells the re-run worker that
/// interrupted jobs of the run can be re-run now. Written straight to the
/// ledger (not through the group-committing writer): there is one per run,
/// not one per job.
async fn record_run(
    state: &AppState,
    body: &[u8],
    id: String,
    delivery: &mut Delivery,
    deadline: Instant,
) -> Result<Accepted, ApiError> {
    let run = match WorkflowRunEvent::parse(body).map_err(|e| ApiError::Malformed(e.to_string()))? {
        ParsedWorkflowRun::Completed(run) => run,
        ParsedWorkflowRun::IgnoredAction(action) => {
            delivery.action = action;
            return Ok(Accepted::Ignored);
        }
    };
    delivery.action = "completed".to_owned();
    let outcome = tokio::time::timeout_at(deadline, state.store.record_workflow_run(&id, &run))
        .await
        .map_err(|_| ApiError::Unavailable("the ledger could not be written in time".into()))?
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    tracing::debug!(run_id = run.run_id, repository = %run.repository, attempt = run.run_attempt, "workflow run completed");
    match outcome {
        DeliveryOutcome::Duplicate => Ok(Accepted::Duplicate),
        DeliveryOutcome::Accepted => {
            state.wake.notify_one();
            Ok(Accepted::Recorded)
        }
    }
}
