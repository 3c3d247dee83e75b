//! `spawn_app()`: the real service on port 0 with a fresh database, driven by
//! a real HTTP client with signed deliveries of GitHub's payload shape.
#![allow(dead_code)]

pub mod fleet;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde_json::Value;
use spot_runners::configuration::{GitHubAuth, Settings};
use spot_runners::http::AppState;
use spot_runners::startup::Application;
use spot_runners_domain::webhook::{delivery_headers, sign, WebhookSecrets};
use spot_runners_store::testing::{test_database, TestDatabase};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SECRET: &str = "It's a Secret to Everybody";

pub struct TestApp {
    pub base: String,
    /// `http://ADDR` of the metrics listener, when the settings asked for one.
    pub metrics_base: Option<String>,
    pub client: reqwest::Client,
    pub db: TestDatabase,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), spot_runners::Error>>>,
}

pub fn settings(db: &TestDatabase, secrets: &str) -> Settings {
    Settings {
        database_url: Some(SecretString::from(db.url.clone())),
        data_dir: PathBuf::from("/nonexistent"),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        webhook_secrets: WebhookSecrets::from_list(secrets),
        controller_id: Default::default(),
        github_api_url: "http://127.0.0.1:9".into(),
        github_auth: GitHubAuth::None,
        reconcile_interval: Duration::from_secs(3600),
        max_instances: 100,
        delivery_retention: Duration::from_secs(7 * 86_400),
        github_orgs: vec![],
        retention: Duration::from_secs(30 * 86_400),
        intake: Default::default(),
        redeliver_from: None,
        max_daily_spend: None,
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with_secrets(SECRET).await
}

pub async fn spawn_app_with_secrets(secrets: &str) -> TestApp {
    spawn_app_with(secrets, |_| {}, None).await
}

/// The service with these settings tweaks and, when given, GitHub and EC2
/// adapters (else it records jobs only).
pub async fn spawn_app_with(
    secrets: &str,
    tweak: impl FnOnce(&mut Settings),
    backends: Option<spot_runners_reconciler::Backends>,
) -> TestApp {
    spawn_app_with_clock(
        secrets,
        tweak,
        backends,
        Arc::new(spot_runners_domain::clock::SystemClock),
    )
    .await
}

/// [`spawn_app_with`], the reconciler on `clock`.
pub async fn spawn_app_with_clock(
    secrets: &str,
    tweak: impl FnOnce(&mut Settings),
    backends: Option<spot_runners_reconciler::Backends>,
    clock: Arc<dyn spot_runners_domain::clock::Clock>,
) -> TestApp {
    spawn_app_on(
        secrets,
        tweak,
        Arc::new(spot_runners::metrics::Metrics::new().unwrap()),
        backends,
        clock,
    )
    .await
}

/// [`spawn_app_with`] reporting into `metrics` (which the backends may
/// share, as the real GitHub adapter does) and reading time from `clock`.
pub async fn spawn_app_on(
    secrets: &str,
    tweak: impl FnOnce(&mut Settings),
    metrics: Arc<spot_runners::metrics::Metrics>,
    backends: Option<spot_runners_reconciler::Backends>,
    clock: Arc<dyn spot_runners_domain::clock::Clock>,
) -> TestApp {
    spot_runners::telemetry::init();
    let db = test_database().await.expect("test database");
    let mut settings = settings(&db, secrets);
    tweak(&mut settings);
    let app = Application::build_with_clock(settings, metrics, backends, clock)
        .await
        .expect("app builds");
    let base = format!("http://{}", app.local_addr());
    let metrics_base = app.metrics_addr().map(|a| format!("http://{a}"));
    let state = app.state().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        base,
        metrics_base,
        client: reqwest::Client::new(),
        db,
        state,
        stop: Some(stop),
        task: Some(task),
    }
}

impl TestApp {
    /// Signs `body` with the test secret and posts it.
    pub async fn deliver(&self, event: &str, delivery: &str, body: &[u8]) -> reqwest::Response {
        self.deliver_signed(event, delivery, body, &sign(SECRET.as_bytes(), body))
            .await
    }

    pub async fn deliver_signed(
        &self,
        event: &str,
        delivery: &str,
        body: &[u8],
        signature: &str,
    ) -> reqwest::Response {
        post_delivery(&self.client, &self.base, event, delivery, body, signature).await
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn insert_profile(&self, name: &str, labels: &[&str]) {
        let labels: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        sqlx::query(
            "INSERT INTO instance_profiles (name, labels, instance_types, image_id, subnet_ids)
             VALUES ($1, $2, '{c6i.4xlarge}', 'ami-0123456789abcdef0', '{}')",
        )
        .bind(name)
        .bind(&labels)
        .execute(self.db.store.pool())
        .await
        .expect("profile inserted");
    }

    /// (status, profile, match_error, runner_name) of a job.
    pub async fn job(&self, id: i64) -> Option<JobRow> {
        sqlx::query_as::<_, JobRow>(
            "SELECT status, profile, match_error, runner_name, conclusion, org, repository,
                    queued_at IS NOT NULL AS queued_seen
             FROM workflow_jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.db.store.pool())
        .await
        .expect("query")
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(self.db.store.pool())
            .await
            .expect("count")
    }

    /// Another session that runs `lock` (a `LOCK TABLE`, a `SELECT … FOR
    /// UPDATE`) and holds what it took until the transaction is rolled back.
    pub async fn hold(&self, lock: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut blocker = self.db.store.pool().begin().await.expect("begin");
        sqlx::query(lock)
            .execute(&mut *blocker)
            .await
            .expect("taking the lock");
        blocker
    }

    /// Waits (bounded) until one of the service's sessions waits on a lock.
    pub async fn until_waiting_on_a_lock(&self, what: &str) {
        self.eventually(what, || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'spot-runners'
                   AND wait_event_type = 'Lock'",
            )
            .fetch_one(self.db.store.pool())
            .await
            .expect("pg_stat_activity");
            waiting > 0
        })
        .await;
    }

    /// Waits (bounded) until `f` holds.
    pub async fn eventually<F, Fut>(&self, what: &str, f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        self.eventually_within(what, Duration::from_secs(10), f)
            .await;
    }

    /// Waits until `f` holds, at most `limit`: for what happens on the
    /// sweep's real-time pace (every 10 s) rather than on the next pass.
    pub async fn eventually_within<F, Fut>(&self, what: &str, limit: Duration, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        while !f().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the service gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("joined").expect("clean shutdown");
        }
    }

    pub fn metrics(&self) -> Arc<spot_runners::metrics::Metrics> {
        Arc::clone(&self.state.metrics)
    }
}

#[derive(Debug, sqlx::FromRow)]
pub struct JobRow {
    pub status: String,
    pub profile: Option<String>,
    pub match_error: Option<String>,
    pub runner_name: Option<String>,
    pub conclusion: Option<String>,
    pub org: Option<String>,
    pub repository: String,
    pub queued_seen: bool,
}

/// POSTs one delivery to `{base}/webhook` as GitHub would.
pub async fn post_delivery(
    client: &reqwest::Client,
    base: &str,
    event: &str,
    delivery: &str,
    body: &[u8],
    signature: &str,
) -> reqwest::Response {
    let mut request = client.post(format!("{base}/webhook")).body(body.to_vec());
    for (name, value) in delivery_headers(event, delivery, signature.to_owned()) {
        request = request.header(name, value);
    }
    request.send().await.expect("request sent")
}

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).expect("fixture")).expect("fixture json")
}

/// A `workflow_job` body of GitHub's real shape (the official organization
/// example), with this job id, action and labels.
pub fn job_payload(action: &str, job_id: i64, labels: &[&str]) -> Vec<u8> {
    let mut v = fixture("workflow_job/in_progress-org-1.json");
    v["action"] = action.into();
    let job = &mut v["workflow_job"];
    job["id"] = job_id.into();
    job["status"] = if action == "waiting" {
        "waiting"
    } else {
        action
    }
    .into();
    job["labels"] = labels.iter().map(|l| Value::from(*l)).collect();
    match action {
        "queued" | "waiting" => {
            job["runner_id"] = Value::Null;
            job["runner_name"] = Value::Null;
            job["started_at"] = job["created_at"].clone();
            job["conclusion"] = Value::Null;
        }
        "completed" => {
            job["conclusion"] = "success".into();
            job["completed_at"] = "2021-10-05T18:02:00Z".into();
        }
        _ => {}
    }
    serde_json::to_vec(&v).unwrap()
}

pub fn fixture_bytes(name: &str) -> Vec<u8> {
    serde_json::to_vec(&fixture(name)).unwrap()
}
