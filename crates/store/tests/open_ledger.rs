//! The planner's open ledger on PostgreSQL: each pass reads only the rows
//! written since the last, yet misses nothing — not a job whose
//! transaction was still open when the planner read, however long it took
//! to commit, and not a runner that ended through another path.

use std::sync::{Arc, Mutex};

use spot_runners_domain::planner::{Launch, NewRunner};
use spot_runners_domain::ports::RunnerScope;
use spot_runners_domain::{ProfileName, RunnerState};
use spot_runners_store::testing::test_database;
use spot_runners_store::{PgStore, PlanSnapshot, Store};

const CONTROLLER: &str = "sr";

fn acme() -> RunnerScope {
    RunnerScope::Org("acme".into())
}

/// What a pass saw: queued jobs of `kani` in acme, and live runners by
/// state. It asks for `launch` new runners.
async fn pass(store: &PgStore, launch: usize) -> (usize, Vec<(RunnerState, usize)>, Vec<String>) {
    let seen: Arc<Mutex<Option<PlanSnapshot>>> = Arc::default();
    let keep = seen.clone();
    let created = store
        .plan_runners(
            CONTROLLER,
            Box::new(move |snap| {
                *keep.lock().unwrap() = Some(snap.clone());
                if launch == 0 {
                    return Vec::new();
                }
                vec![Launch {
                    profile: ProfileName::parse("kani").unwrap(),
                    runners: (0..launch)
                        .map(|k| NewRunner {
                            scope: acme(),
                            covers: Some(k),
                        })
                        .collect(),
                }]
            }),
        )
        .await
        .unwrap();
    let snap = seen.lock().unwrap().take().expect("the plan ran");
    let queued = snap
        .demand
        .get("kani")
        .and_then(|d| d.queued.get(&acme()))
        .map_or(0, |q| q.jobs);
    let mut runners: Vec<(RunnerState, usize)> =
        snap.runners.iter().map(|r| (r.state, r.runners)).collect();
    runners.sort();
    (
        queued,
        runners,
        created.into_iter().map(|r| r.name).collect(),
    )
}

/// Ends a requested runner the way a failed launch does.
async fn launch_failed(store: &PgStore, runner: &str) {
    assert!(store
        .end_runner_if(
            runner,
            RunnerState::Requested,
            RunnerState::LaunchFailed,
            "test"
        )
        .await
        .unwrap());
}

const INSERT_JOB: &str =
    "INSERT INTO workflow_jobs (id, run_id, repository, owner, org, labels, status,
                                                     profile, first_seen_at)
                          VALUES ($1, 1, 'acme/proofs', 'acme', 'acme', '{kani}', 'queued', 'kani',
                                  now() - make_interval(secs => $1::int))";

#[tokio::test]
async fn a_job_committed_after_a_pass_read_past_it_is_counted_by_the_next() {
    let db = test_database().await.unwrap();
    let store = &db.store;
    let pool = store.pool();
    assert_eq!(pass(store, 0).await.0, 0);

    // A delivery batch that has written job 1 but not committed yet.
    let mut slow = pool.begin().await.unwrap();
    sqlx::query(INSERT_JOB)
        .bind(1_i64)
        .execute(&mut *slow)
        .await
        .unwrap();
    assert_eq!(pass(store, 0).await.0, 0, "not committed: not demand");

    // Others commit meanwhile, and passes read past them.
    sqlx::query(INSERT_JOB)
        .bind(2_i64)
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(pass(store, 0).await.0, 1);
    assert_eq!(pass(store, 0).await.0, 1);

    slow.commit().await.unwrap();
    assert_eq!(pass(store, 0).await.0, 2, "the slow commit is not lost");

    // A job that starts leaves the queue, once.
    sqlx::query("UPDATE workflow_jobs SET status = 'in_progress' WHERE id = 2")
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(pass(store, 0).await.0, 1);
    assert_eq!(pass(store, 0).await.0, 1);
}

#[tokio::test]
async fn runners_a_pass_creates_are_counted_until_they_end_and_learn_when_their_job_arrived() {
    let db = test_database().await.unwrap();
    let store = &db.store;
    let pool = store.pool();
    for id in [30_i64, 20, 10] {
        sqlx::query(INSERT_JOB)
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
    }
    let (queued, runners, created) = pass(store, 2).await;
    assert_eq!((queued, runners), (3, vec![]));
    assert_eq!(created.len(), 2);

    // The first runner covers the oldest job (30 s old), the second the next.
    let covered: Vec<i64> = sqlx::query_scalar(
        "SELECT j.id FROM runners r JOIN workflow_jobs j ON j.first_seen_at = r.demand_since
         ORDER BY r.demand_since",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(covered, [30, 20]);

    let (_, runners, _) = pass(store, 0).await;
    assert_eq!(runners, [(RunnerState::Requested, 2)]);

    // Ended elsewhere (a sweep, another replica): gone from the count.
    launch_failed(store, &created[0]).await;
    let (_, runners, _) = pass(store, 0).await;
    assert_eq!(runners, [(RunnerState::Requested, 1)]);
}

#[tokio::test]
async fn two_stores_on_one_database_each_see_what_the_other_wrote() {
    let db = test_database().await.unwrap();
    let other = PgStore::connect(&db.url).await.unwrap();
    sqlx::query(INSERT_JOB)
        .bind(5_i64)
        .execute(db.store.pool())
        .await
        .unwrap();
    let (_, _, created) = pass(&db.store, 1).await;
    assert_eq!(created.len(), 1);
    let (queued, runners, _) = pass(&other, 0).await;
    assert_eq!((queued, runners), (1, vec![(RunnerState::Requested, 1)]));
    launch_failed(&other, &created[0]).await;
    assert_eq!(pass(&db.store, 0).await.1, vec![]);
}

#[tokio::test]
async fn settling_misses_no_start_or_completion_whose_commit_came_late() {
    let db = test_database().await.unwrap();
    let store = &db.store;
    let pool = store.pool();
    sqlx::query(INSERT_JOB)
        .bind(7_i64)
        .execute(pool)
        .await
        .unwrap();
    let (_, _, created) = pass(store, 1).await;
    let runner = &created[0];
    sqlx::query("UPDATE runners SET state = 'booting', instance_id = 'i-7' WHERE name = $1")
        .bind(runner)
        .execute(pool)
        .await
        .unwrap();
    let state = || async {
        sqlx::query_scalar::<_, String>("SELECT state FROM runners WHERE name = $1")
            .bind(runner)
            .fetch_one(pool)
            .await
            .unwrap()
    };
    assert!(store.settle_jobs(CONTROLLER).await.unwrap().is_empty());

    let mut slow = pool.begin().await.unwrap();
    sqlx::query("UPDATE workflow_jobs SET status = 'in_progress', runner_name = $1 WHERE id = 7")
        .bind(runner)
        .execute(&mut *slow)
        .await
        .unwrap();
    assert!(store.settle_jobs(CONTROLLER).await.unwrap().is_empty());
    assert_eq!(state().await, "booting");
    slow.commit().await.unwrap();
    assert!(store.settle_jobs(CONTROLLER).await.unwrap().is_empty());
    assert_eq!(state().await, "busy");

    let mut slow = pool.begin().await.unwrap();
    sqlx::query("UPDATE workflow_jobs SET status = 'completed' WHERE id = 7")
        .execute(&mut *slow)
        .await
        .unwrap();
    assert!(store.settle_jobs(CONTROLLER).await.unwrap().is_empty());
    slow.commit().await.unwrap();
    let done = store.settle_jobs(CONTROLLER).await.unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(&done[0].0.name, runner);
    assert_eq!(state().await, "terminating");
}
