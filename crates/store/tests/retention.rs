//! Retention: completed jobs and ended runners past their age go, in
//! batches, oldest first; open jobs and live runners never do.

use std::time::Duration;

use spot_runners_store::testing::test_database;
use spot_runners_store::{Pruned, Store};

const DAY: Duration = Duration::from_secs(86_400);

async fn job(pool: &sqlx::PgPool, id: i64, status: &str, completed_days_ago: Option<i64>) {
    sqlx::query(
        "INSERT INTO workflow_jobs (id, run_id, repository, owner, org, labels, status,
                                    completed_at, first_seen_at)
         VALUES ($1, 1, 'acme/proofs', 'acme', 'acme', '{kani}', $2,
                 now() - make_interval(days => $3::int), now() - interval '60 days')",
    )
    .bind(id)
    .bind(status)
    .bind(completed_days_ago.map(|d| d as i32))
    .execute(pool)
    .await
    .unwrap();
}

async fn runner(pool: &sqlx::PgPool, name: &str, controller: &str, state: &str, days_ago: i32) {
    sqlx::query(
        "INSERT INTO runners (name, controller_id, profile, state, org, updated_at)
         VALUES ($1, $2, 'kani', $3, 'acme', now() - make_interval(days => $4))",
    )
    .bind(name)
    .bind(controller)
    .bind(state)
    .bind(days_ago)
    .execute(pool)
    .await
    .unwrap();
}

async fn ids(pool: &sqlx::PgPool, sql: &str) -> Vec<String> {
    sqlx::query_scalar(sql).fetch_all(pool).await.unwrap()
}

#[tokio::test]
async fn old_completed_jobs_and_ended_runners_are_pruned_in_batches() {
    let db = test_database().await.unwrap();
    let pool = db.store.pool();
    for (id, days) in [(1, 45), (2, 40), (3, 31)] {
        job(pool, id, "completed", Some(days)).await;
    }
    job(pool, 4, "completed", Some(2)).await;
    // Open, however old: still demand (or a job in progress).
    job(pool, 5, "queued", None).await;
    job(pool, 6, "in_progress", None).await;

    runner(pool, "sr-kani-old1", "sr", "terminated", 50).await;
    runner(pool, "sr-kani-old2", "sr", "interrupted", 40).await;
    runner(pool, "sr-kani-new", "sr", "terminated", 1).await;
    // Live, however long ago it last changed.
    runner(pool, "sr-kani-live", "sr", "busy", 50).await;
    // Another deployment's rows are its own leader's to prune.
    runner(pool, "other-kani-old", "other", "terminated", 50).await;

    let retention = 30 * DAY;
    let first = db.store.prune_ledger("sr", retention, 2).await.unwrap();
    assert_eq!(
        first,
        Pruned {
            jobs: 2,
            runners: 2
        }
    );
    assert_eq!(
        ids(pool, "SELECT id::text FROM workflow_jobs ORDER BY id").await,
        ["3", "4", "5", "6"],
        "the oldest went first"
    );
    let second = db.store.prune_ledger("sr", retention, 2).await.unwrap();
    assert_eq!(
        second,
        Pruned {
            jobs: 1,
            runners: 0
        }
    );
    assert_eq!(
        db.store.prune_ledger("sr", retention, 2).await.unwrap(),
        Pruned::default()
    );
    assert_eq!(
        ids(pool, "SELECT id::text FROM workflow_jobs ORDER BY id").await,
        ["4", "5", "6"]
    );
    assert_eq!(
        ids(pool, "SELECT name FROM runners ORDER BY name").await,
        ["other-kani-old", "sr-kani-live", "sr-kani-new"]
    );
}
