//! `record_deliveries` writes a whole batch with a few set-based statements.
//! Whatever a batch holds — several deliveries of one job in any order, the
//! same GUID twice — the ledger must end up exactly as if the deliveries
//! had been recorded one at a time, in batch order.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use spot_runners_domain::{JobStatus, WorkflowJobEvent};
use spot_runners_store::testing::test_database;
use spot_runners_store::{DeliveryOutcome, IncomingDelivery, PgStore, Store};
use std::time::Instant;

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

fn event(job_id: i64, status: JobStatus, attempt: i32) -> WorkflowJobEvent {
    let running = matches!(status, JobStatus::InProgress | JobStatus::Completed);
    WorkflowJobEvent {
        job_id,
        run_id: job_id / 10,
        run_attempt: attempt,
        status,
        name: format!("proof {job_id}"),
        workflow_name: Some("Kani".into()),
        labels: vec!["self-hosted".into(), "kani".into()],
        conclusion: (status == JobStatus::Completed).then(|| "success".into()),
        runner_id: running.then_some(job_id + 7),
        runner_name: running.then(|| format!("runner-{job_id}")),
        repository: "acme/proofs".into(),
        owner: "acme".into(),
        org: Some("acme".into()),
        installation_id: Some(42),
        html_url: Some(format!("https://github.com/acme/proofs/runs/{job_id}")),
        created_at: Some(Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0).unwrap()),
        started_at: None,
        completed_at: None,
    }
}

fn delivery(guid: &str, job: WorkflowJobEvent, profile: Result<&str, &str>) -> IncomingDelivery {
    IncomingDelivery {
        delivery_id: guid.into(),
        job,
        profile: profile.map(str::to_owned).map_err(str::to_owned),
    }
}

/// Everything a delivery can change about a job, timestamps as "set or not"
/// (each transaction has its own `now()`).
#[derive(Debug, PartialEq, Eq, sqlx::FromRow)]
struct Row {
    id: i64,
    status: String,
    run_attempt: i32,
    name: String,
    labels: Vec<String>,
    conclusion: Option<String>,
    runner_id: Option<i64>,
    runner_name: Option<String>,
    installation_id: Option<i64>,
    html_url: Option<String>,
    profile: Option<String>,
    match_error: Option<String>,
    github_created_at: Option<DateTime<Utc>>,
    waiting_seen: bool,
    queued_seen: bool,
    in_progress_seen: bool,
    completed_seen: bool,
}

async fn rows(store: &PgStore) -> Vec<Row> {
    sqlx::query_as(
        "SELECT id, status, run_attempt, name, labels, conclusion, runner_id, runner_name,
                installation_id, html_url, profile, match_error, github_created_at,
                waiting_at IS NOT NULL AS waiting_seen, queued_at IS NOT NULL AS queued_seen,
                in_progress_at IS NOT NULL AS in_progress_seen,
                completed_at IS NOT NULL AS completed_seen
         FROM workflow_jobs ORDER BY id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap()
}

async fn guids(store: &PgStore) -> Vec<String> {
    sqlx::query_scalar("SELECT delivery_id FROM webhook_deliveries ORDER BY delivery_id")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn one_batch_with_every_status_of_a_job_in_reverse_order_ends_completed() {
    let db = test_database().await.unwrap();
    let batch = [
        delivery("c", event(9, JobStatus::Completed, 1), Ok("kani")),
        delivery("i", event(9, JobStatus::InProgress, 1), Ok("kani")),
        delivery("q", event(9, JobStatus::Queued, 1), Ok("kani")),
        delivery("w", event(9, JobStatus::Waiting, 1), Ok("kani")),
    ];
    let outcomes = db
        .store
        .record_deliveries(&batch, deadline())
        .await
        .unwrap();
    assert_eq!(outcomes, vec![DeliveryOutcome::Accepted; 4]);
    let rows = rows(&db.store).await;
    assert_eq!(rows.len(), 1);
    let job = &rows[0];
    assert_eq!(job.status, "completed");
    assert_eq!(job.conclusion.as_deref(), Some("success"));
    assert_eq!(job.runner_name.as_deref(), Some("runner-9"));
    assert!(job.waiting_seen && job.queued_seen && job.in_progress_seen && job.completed_seen);

    // A later batch with an older status moves nothing back.
    let outcomes = db
        .store
        .record_deliveries(
            &[delivery("q2", event(9, JobStatus::Queued, 1), Ok("kani"))],
            deadline(),
        )
        .await
        .unwrap();
    assert_eq!(outcomes, vec![DeliveryOutcome::Accepted]);
    assert_eq!(rows_status(&db.store, 9).await, "completed");
}

async fn rows_status(store: &PgStore, id: i64) -> String {
    sqlx::query_scalar("SELECT status FROM workflow_jobs WHERE id = $1")
        .bind(id)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_guid_twice_in_one_batch_is_a_duplicate_of_its_first_occurrence() {
    let db = test_database().await.unwrap();
    db.store
        .record_deliveries(
            &[delivery("seen", event(1, JobStatus::Queued, 1), Ok("kani"))],
            deadline(),
        )
        .await
        .unwrap();
    let batch = [
        delivery("a", event(2, JobStatus::Queued, 1), Ok("kani")),
        // The same GUID again within the batch: a redelivery.
        delivery("a", event(2, JobStatus::Queued, 1), Ok("kani")),
        // Seen in an earlier batch; its (newer) status must not apply.
        delivery("seen", event(1, JobStatus::Completed, 1), Ok("kani")),
        delivery("b", event(2, JobStatus::InProgress, 1), Ok("kani")),
        delivery("b", event(2, JobStatus::InProgress, 1), Ok("kani")),
    ];
    let outcomes = db
        .store
        .record_deliveries(&batch, deadline())
        .await
        .unwrap();
    use DeliveryOutcome::{Accepted, Duplicate};
    assert_eq!(
        outcomes,
        vec![Accepted, Duplicate, Duplicate, Accepted, Duplicate]
    );
    assert_eq!(guids(&db.store).await, ["a", "b", "seen"]);
    assert_eq!(rows_status(&db.store, 1).await, "queued");
    assert_eq!(rows_status(&db.store, 2).await, "in_progress");
}

#[tokio::test]
async fn a_batch_that_cannot_commit_in_time_records_nothing() {
    let db = test_database().await.unwrap();
    let mut blocker = db.store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE webhook_deliveries IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let batch = [
        delivery("x", event(3, JobStatus::Queued, 1), Ok("kani")),
        delivery("y", event(4, JobStatus::Queued, 1), Ok("kani")),
    ];
    let result = db
        .store
        .record_deliveries(&batch, Instant::now() + Duration::from_millis(300))
        .await;
    assert!(result.is_err(), "{result:?}");
    blocker.rollback().await.unwrap();
    assert!(guids(&db.store).await.is_empty());
    assert!(rows(&db.store).await.is_empty());
    // Not seen: the same deliveries are accepted when they come again.
    let outcomes = db
        .store
        .record_deliveries(&batch, deadline())
        .await
        .unwrap();
    assert_eq!(outcomes, vec![DeliveryOutcome::Accepted; 2]);
}

/// Random batches (few jobs, every status, re-run attempts, profile or no
/// profile, GUIDs repeated within and across batches), written once as
/// batches and once one delivery per call: same outcomes, same ledger.
#[tokio::test]
async fn batches_leave_the_ledger_as_one_delivery_at_a_time_would() {
    let batched = test_database().await.unwrap();
    let serial = test_database().await.unwrap();
    let mut rng = StdRng::seed_from_u64(13);
    let statuses = [
        JobStatus::Waiting,
        JobStatus::Queued,
        JobStatus::InProgress,
        JobStatus::Completed,
    ];
    let mut guid = 0;
    let mut sent: Vec<String> = Vec::new();
    for round in 0..30 {
        let mut batch = Vec::new();
        for _ in 0..rng.gen_range(1..=24) {
            let id = rng.gen_range(1..=6) + 100 * (round % 3);
            let mut job = event(
                id,
                *statuses.choose(&mut rng).unwrap(),
                rng.gen_range(1..=2),
            );
            if rng.gen_bool(0.2) {
                job.html_url = None;
                job.installation_id = None;
            }
            if rng.gen_bool(0.2) {
                job.labels.push(format!("extra-{}", rng.gen_range(0..3)));
            }
            let profile = if rng.gen_bool(0.3) {
                Err("no profile fits")
            } else {
                Ok("kani")
            };
            let id = if !sent.is_empty() && rng.gen_bool(0.15) {
                sent.choose(&mut rng).unwrap().clone()
            } else {
                guid += 1;
                format!("g-{guid}")
            };
            sent.push(id.clone());
            batch.push(delivery(&id, job, profile));
        }
        let got = batched
            .store
            .record_deliveries(&batch, deadline())
            .await
            .unwrap();
        let mut want = Vec::new();
        for d in &batch {
            want.extend(
                serial
                    .store
                    .record_deliveries(std::slice::from_ref(d), deadline())
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(got, want, "outcomes of round {round}");
        assert_eq!(
            rows(&batched.store).await,
            rows(&serial.store).await,
            "ledger after round {round}"
        );
    }
    assert_eq!(guids(&batched.store).await, guids(&serial.store).await);
}

/// The next wake-up on the channel, or a panic after 10 s.
async fn next_wake(listener: &mut sqlx::postgres::PgListener) -> String {
    tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("no wake-up within 10 s")
        .unwrap()
        .payload()
        .to_owned()
}

#[tokio::test]
async fn a_batch_wakes_the_reconcilers_only_when_something_in_it_was_new() {
    let db = test_database().await.unwrap();
    let mut listener = db.store.wake_listener().await.unwrap();
    let batch = [
        delivery("n1", event(31, JobStatus::Queued, 1), Ok("kani")),
        delivery("n2", event(32, JobStatus::Queued, 1), Ok("kani")),
    ];
    db.store
        .record_deliveries(&batch, deadline())
        .await
        .unwrap();
    // One wake-up per batch, however many deliveries were new in it.
    assert_eq!(next_wake(&mut listener).await, "");

    // GitHub redelivering what is already recorded changes nothing, so it
    // wakes nobody: the next wake-up to arrive is the marker sent after it.
    let outcomes = db
        .store
        .record_deliveries(&batch, deadline())
        .await
        .unwrap();
    assert_eq!(outcomes, vec![DeliveryOutcome::Duplicate; 2]);
    sqlx::query("SELECT pg_notify($1, 'marker')")
        .bind(spot_runners_store::WAKE_CHANNEL)
        .execute(db.store.pool())
        .await
        .unwrap();
    assert_eq!(next_wake(&mut listener).await, "marker");
}

#[tokio::test]
async fn a_batch_on_a_connection_the_server_dropped_is_written_on_another() {
    let db = test_database().await.unwrap();
    let first = [delivery("d1", event(41, JobStatus::Queued, 1), Ok("kani"))];
    db.store
        .record_deliveries(&first, deadline())
        .await
        .unwrap();
    // Every connection the store holds is ended by the server while it sits
    // idle in the pool, as a restart or an administrator would.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND application_name = 'spot-runners'",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!ended.is_empty() && ended.iter().all(|&e| e));

    let second = [delivery("d2", event(42, JobStatus::Queued, 1), Ok("kani"))];
    let outcomes = db
        .store
        .record_deliveries(&second, deadline())
        .await
        .unwrap();
    assert_eq!(outcomes, vec![DeliveryOutcome::Accepted]);
    // Read on the test's own session: the store's other pool lost its
    // connections too, and finds out on its next statement.
    let status: String = sqlx::query_scalar("SELECT status FROM workflow_jobs WHERE id = 42")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(status, "queued");
}
