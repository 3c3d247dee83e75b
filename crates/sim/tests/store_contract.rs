//! The `Store` contract, run against both implementations: the in-memory
//! `MemoryStore` the simulator uses and `PgStore` on a real PostgreSQL
//! (a throwaway database per test, from the store crate's harness). Every
//! trait method is exercised; each `contract!` line is two tests.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use spot_runners_domain::planner::{Launch, NewRunner};
use spot_runners_domain::ports::RunnerScope;
use spot_runners_domain::profile::{example_row, ProfileRow};
use spot_runners_domain::stale::StaleCutoffs;
use spot_runners_domain::store::{
    DeliveryOutcome, IncomingDelivery, JobCheck, MarketQuery, RunnerChange, Store, StoreError,
};
use spot_runners_domain::{JobStatus, ProfileName, RunnerState, WorkflowJobEvent};
use spot_runners_sim::{ManualClock, MemoryStore};
use spot_runners_store::testing::{test_database, TestDatabase};
use spot_runners_store::PgStore;

const CONTROLLER: &str = "spot-runners";
/// The provisioner holding the rows `plan` claims.
const OWNER: &str = "replica-a";

#[async_trait]
trait Subject: Send + Sync {
    fn store(&self) -> Arc<dyn Store>;
    /// Another session on the same ledger (another replica).
    async fn other_session(&self) -> Arc<dyn Store>;
    async fn add_profile(&self, row: ProfileRow);
    /// Moves the store's clock on (both stores read time only from it).
    fn advance(&self, by: Duration);
}

struct Memory(MemoryStore, ManualClock);

#[async_trait]
impl Subject for Memory {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.0.clone())
    }
    async fn other_session(&self) -> Arc<dyn Store> {
        Arc::new(self.0.session())
    }
    async fn add_profile(&self, row: ProfileRow) {
        let mut rows = futures_rows(&self.0).await;
        rows.push(row);
        self.0.set_profile_rows(rows);
    }
    fn advance(&self, by: Duration) {
        self.1.advance(by);
    }
}

async fn futures_rows(s: &MemoryStore) -> Vec<ProfileRow> {
    s.profile_rows().await.unwrap()
}

struct Postgres {
    db: TestDatabase,
    store: PgStore,
    clock: ManualClock,
}

#[async_trait]
impl Subject for Postgres {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }
    async fn other_session(&self) -> Arc<dyn Store> {
        Arc::new(
            PgStore::connect(&self.db.url)
                .await
                .unwrap()
                .with_clock(Arc::new(self.clock.clone())),
        )
    }
    async fn add_profile(&self, row: ProfileRow) {
        sqlx_insert(&self.store, &row).await;
    }
    fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

async fn sqlx_insert(store: &PgStore, row: &ProfileRow) {
    spot_runners_store::testing::insert_profile(store, row)
        .await
        .unwrap();
}

fn memory() -> Memory {
    let clock = ManualClock::new();
    Memory(MemoryStore::new(Arc::new(clock.clone()), 7), clock)
}

async fn postgres() -> Postgres {
    let db = test_database().await.unwrap();
    let clock = ManualClock::new();
    let store = PgStore::connect(&db.url)
        .await
        .unwrap()
        .with_clock(Arc::new(clock.clone()));
    Postgres { db, store, clock }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$name(&super::memory()).await;
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(&super::postgres().await).await;
            }
        }
    )*};
}

contract!(
    deliveries_are_deduplicated_and_status_only_moves_forward,
    jobs_are_counted_matched_and_listed,
    delivery_guids_are_pruned,
    planning_writes_rows_under_one_lock,
    claims_skip_leased_rows_and_leases_renew_and_lapse,
    transitions_follow_the_lifecycle,
    jobs_settle_runners_and_each_completion_is_claimed_once,
    listings_mark_runners_online_and_busy_and_reaps_are_conditional,
    stale_jobs_are_due_by_the_rule_and_checks_move_status_forward,
    one_session_leads,
    profiles_and_liveness,
    ledger_is_pruned_past_retention_and_guids_are_known,
    provisioning_writes_are_compare_and_set,
    spot_prices_are_recorded_and_usage_covers_the_window,
    interruptions_lead_to_one_rerun_per_job_and_the_market_sees_them,
    a_rerun_not_needed_is_terminal_and_not_a_loss,
    settling_reads_what_changed_a_late_runner_name_included,
    the_queue_is_counted_by_scope_and_new_runners_learn_when_their_job_arrived,
);

fn event(id: i64, status: JobStatus, runner: Option<&str>) -> WorkflowJobEvent {
    WorkflowJobEvent {
        job_id: id,
        run_id: 500,
        run_attempt: 1,
        status,
        name: format!("proof {id}"),
        workflow_name: Some("Kani".into()),
        labels: vec!["self-hosted".into(), "kani".into()],
        conclusion: (status == JobStatus::Completed).then(|| "success".into()),
        runner_id: runner.map(|_| 1),
        runner_name: runner.map(str::to_owned),
        repository: "acme/proofs".into(),
        owner: "acme".into(),
        org: Some("acme".into()),
        installation_id: Some(9),
        html_url: None,
        created_at: None,
        started_at: None,
        completed_at: None,
    }
}

fn delivery(guid: &str, ev: WorkflowJobEvent, profile: Result<&str, &str>) -> IncomingDelivery {
    IncomingDelivery {
        delivery_id: guid.into(),
        job: ev,
        profile: profile.map(str::to_owned).map_err(str::to_owned),
    }
}

fn soon() -> std::time::Instant {
    (tokio::time::Instant::now() + Duration::from_secs(10)).into_std()
}

async fn record(s: &dyn Store, batch: &[IncomingDelivery]) -> Vec<DeliveryOutcome> {
    s.record_deliveries(batch, soon()).await.unwrap()
}

fn org() -> RunnerScope {
    RunnerScope::Org("acme".into())
}

/// `n` planned runners, claimed by [`OWNER`] as a provisioner would.
async fn plan(s: &dyn Store, n: usize) -> Vec<String> {
    let names = plan_unclaimed(s, n).await;
    let claimed = s
        .claim_provisioning(CONTROLLER, OWNER, Duration::from_secs(600), 1000)
        .await
        .unwrap();
    assert_eq!(claimed.len(), names.len());
    names
}

/// The planner's answer, fixed: `n` runners of `kani` for acme.
async fn plan_unclaimed(s: &dyn Store, n: usize) -> Vec<String> {
    let rows = s
        .plan_runners(
            CONTROLLER,
            Box::new(move |_| {
                vec![Launch {
                    profile: ProfileName::parse("kani").unwrap(),
                    runners: (0..n)
                        .map(|_| NewRunner {
                            scope: RunnerScope::Org("acme".into()),
                            covers: None,
                        })
                        .collect(),
                }]
            }),
        )
        .await
        .unwrap();
    rows.into_iter().map(|r| r.name).collect()
}

async fn state(s: &dyn Store, name: &str) -> RunnerState {
    s.runner_states(CONTROLLER, &[name.to_owned()])
        .await
        .unwrap()[name]
}

async fn booting(s: &dyn Store, name: &str, instance: &str) {
    booting_by(s, OWNER, name, instance).await;
}

async fn booting_by(s: &dyn Store, owner: &str, name: &str, instance: &str) {
    let registered = RunnerChange::Registered {
        github_runner_id: 5,
    };
    assert!(s.update_runner(name, owner, registered).await.unwrap());
    let booting = RunnerChange::Booting {
        instance_id: instance.into(),
        instance_type: "c6i.4xlarge".into(),
        subnet_id: None,
        market: "spot".into(),
    };
    assert!(s.update_runner(name, owner, booting).await.unwrap());
}

async fn deliveries_are_deduplicated_and_status_only_moves_forward(t: &dyn Subject) {
    let s = t.store();
    let s = s.as_ref();
    let first = record(
        s,
        &[
            delivery("g1", event(1, JobStatus::InProgress, Some("r")), Ok("kani")),
            delivery("g1", event(1, JobStatus::Completed, None), Ok("kani")),
        ],
    )
    .await;
    assert_eq!(
        first,
        [DeliveryOutcome::Accepted, DeliveryOutcome::Duplicate]
    );
    // An older status, delivered late, changes nothing.
    assert_eq!(
        record(
            s,
            &[delivery(
                "g2",
                event(1, JobStatus::Queued, None),
                Ok("kani")
            )]
        )
        .await,
        [DeliveryOutcome::Accepted]
    );
    let job = s.job(1).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::InProgress);
    assert_eq!(job.runner_name.as_deref(), Some("r"));
    assert!(job.in_progress_at.is_some() && job.queued_at.is_some());
    record(
        s,
        &[delivery(
            "g3",
            event(1, JobStatus::Completed, None),
            Ok("kani"),
        )],
    )
    .await;
    let job = s.job(1).await.unwrap().unwrap();
    assert_eq!(
        (job.status, job.conclusion.as_deref()),
        (JobStatus::Completed, Some("success"))
    );
    assert!(s.job(2).await.unwrap().is_none());
    assert_eq!(s.record_deliveries(&[], soon()).await.unwrap(), []);
    let past = std::time::Instant::now()
        .checked_sub(Duration::from_secs(1))
        .unwrap_or_else(std::time::Instant::now);
    let late = s
        .record_deliveries(
            &[delivery(
                "g9",
                event(9, JobStatus::Queued, None),
                Ok("kani"),
            )],
            past,
        )
        .await;
    assert!(matches!(late, Err(StoreError::Timeout)), "{late:?}");
    assert!(s.job(9).await.unwrap().is_none(), "nothing half-written");
}

async fn jobs_are_counted_matched_and_listed(t: &dyn Subject) {
    let s = t.store();
    let s = s.as_ref();
    record(
        s,
        &[
            delivery("a", event(1, JobStatus::Queued, None), Ok("kani")),
            delivery(
                "b",
                event(2, JobStatus::Queued, None),
                Err("no profile fits"),
            ),
            delivery("c", event(3, JobStatus::Completed, None), Ok("kani")),
        ],
    )
    .await;
    let mut counts: Vec<(Option<String>, JobStatus, i64)> = s
        .job_counts(Duration::from_secs(3600))
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.profile, c.status, c.count))
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        [
            (None, JobStatus::Queued, 1),
            (Some("kani".into()), JobStatus::Queued, 1),
            (Some("kani".into()), JobStatus::Completed, 1),
        ]
    );
    let unmatched = s.unmatched_open_jobs(10).await.unwrap();
    assert_eq!(unmatched.len(), 1);
    assert_eq!(unmatched[0].0, 2);
    assert_eq!(unmatched[0].2, "acme/proofs");
    let demand = s.demand().await.unwrap();
    assert_eq!(demand["kani"].jobs(), 1);
    // Warm pools register only for profiles that exist.
    assert_eq!(demand["kani"].warm_scope, None);
    t.add_profile(example_row("kani", &["linux", "kani"])).await;
    let demand = s.demand().await.unwrap();
    assert_eq!(demand["kani"].warm_scope, Some(org()));
    s.set_job_profile(2, Ok("kani")).await.unwrap();
    assert!(s.unmatched_open_jobs(10).await.unwrap().is_empty());
    assert_eq!(s.demand().await.unwrap()["kani"].jobs(), 2);
    s.set_job_profile(2, Err("profile deleted")).await.unwrap();
    assert_eq!(
        s.job(2).await.unwrap().unwrap().match_error.as_deref(),
        Some("profile deleted")
    );
    let known = s.known_jobs(&[1, 2, 77]).await.unwrap();
    assert_eq!(known.into_iter().collect::<Vec<_>>(), [1, 2]);
    let since = chrono::Utc::now() - chrono::Duration::hours(1);
    let repos = s.recent_repositories(since).await.unwrap();
    assert_eq!(repos.len(), 1);
    assert_eq!(
        (
            repos[0].repository.as_str(),
            repos[0].org.as_deref(),
            repos[0].installation_id
        ),
        ("acme/proofs", Some("acme"), Some(9))
    );
    // Every job so far was queued, or ran on no runner: nothing unannounced.
    assert_eq!(repos[0].unqueued_job_seen_at, None);
    // A job first seen running: its `queued` was lost, the repository is
    // suspect from that moment.
    t.advance(Duration::from_secs(1));
    record(
        s,
        &[delivery(
            "d",
            event(4, JobStatus::InProgress, Some("r-4")),
            Ok("kani"),
        )],
    )
    .await;
    let after = s.recent_repositories(since).await.unwrap();
    assert_eq!(after.len(), 1);
    assert!(after[0].last_job_seen_at > repos[0].last_job_seen_at);
    assert_eq!(
        after[0].unqueued_job_seen_at,
        Some(after[0].last_job_seen_at)
    );
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    assert!(s.recent_repositories(later).await.unwrap().is_empty());
}

async fn delivery_guids_are_pruned(t: &dyn Subject) {
    let s = t.store();
    let s = s.as_ref();
    let d = delivery("g", event(1, JobStatus::Queued, None), Ok("kani"));
    record(s, std::slice::from_ref(&d)).await;
    assert_eq!(
        s.prune_deliveries(Duration::from_secs(3600)).await.unwrap(),
        0
    );
    t.advance(Duration::from_secs(1));
    assert_eq!(s.prune_deliveries(Duration::ZERO).await.unwrap(), 1);
    // Forgotten: a redelivery is processed again.
    assert_eq!(record(s, &[d]).await, [DeliveryOutcome::Accepted]);
}

async fn planning_writes_rows_under_one_lock(t: &dyn Subject) {
    let s = t.store();
    let s = s.as_ref();
    record(
        s,
        &[delivery("a", event(1, JobStatus::Queued, None), Ok("kani"))],
    )
    .await;
    let seen = Arc::new(std::sync::Mutex::new(None));
    let saw = Arc::clone(&seen);
    let none = s
        .plan_runners(
            CONTROLLER,
            Box::new(move |snap| {
                *saw.lock().unwrap() = Some((snap.demand.clone(), snap.runners.len()));
                Vec::new()
            }),
        )
        .await
        .unwrap();
    assert!(none.is_empty());
    let (demand, runners) = seen.lock().unwrap().take().unwrap();
    assert_eq!((demand["kani"].jobs(), runners), (1, 0));
    let names = plan(s, 3).await;
    assert_eq!(names.len(), 3);
    for n in &names {
        assert!(n.starts_with("spot-runners-kani-"), "{n}");
        assert_eq!(state(s, n).await, RunnerState::Requested);
    }
    let runners = s.runners(CONTROLLER, Duration::ZERO).await.unwrap();
    assert_eq!(runners.len(), 3);
    assert_eq!(runners[0].scope, org());
    assert_eq!(
        s.runner_scopes(CONTROLLER, Duration::ZERO).await.unwrap(),
        [org()]
    );
    // The snapshot counts the rows just written.
    let counted = s
        .plan_runners(
            CONTROLLER,
            Box::new(|snap| {
                // Counted, not listed.
                assert_eq!(snap.runners.len(), 1);
                assert_eq!(snap.runners[0].runners, 3);
                assert_eq!(snap.runners[0].state, RunnerState::Requested);
                Vec::new()
            }),
        )
        .await
        .unwrap();
    assert!(counted.is_empty());
    booting(s, &names[0], "i-1").await;
    let mut fleet = s.fleet_counts(CONTROLLER, Duration::ZERO).await.unwrap();
    fleet.sort_by_key(|c| c.state);
    let fleet: Vec<_> = fleet
        .into_iter()
        .map(|c| (c.profile, c.state, c.with_instance, c.runners))
        .collect();
    assert_eq!(
        fleet,
        [
            ("kani".to_owned(), RunnerState::Requested, false, 2),
            ("kani".to_owned(), RunnerState::Booting, true, 1),
        ]
    );
    assert!(s
        .runners("other-controller", Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
}

/// The planner sees the queue as counts per scope; a new runner's
/// `demand_since` is the first-seen time of the job at the place it covers
/// (read from either end of the queue), and `job` tells a queued job's place.
async fn the_queue_is_counted_by_scope_and_new_runners_learn_when_their_job_arrived(
    t: &dyn Subject,
) {
    let s = t.store();
    let s = s.as_ref();
    let mut seen_at = Vec::new();
    for id in 1..=5 {
        let mut ev = event(id, JobStatus::Queued, None);
        if id == 3 {
            ev.org = None;
            ev.owner = "alice".into();
            ev.repository = "alice/proofs".into();
        }
        record(s, &[delivery(&format!("q{id}"), ev, Ok("kani"))]).await;
        seen_at.push(s.job(id).await.unwrap().unwrap().first_seen_at);
        t.advance(Duration::from_secs(10));
    }
    let alice = RunnerScope::Repo("alice/proofs".into());
    for (id, place) in [(1, 1), (3, 3), (5, 5)] {
        let job = s.job(id).await.unwrap().unwrap();
        assert_eq!(job.queue_position, Some(place), "job {id}");
    }
    let rows = s
        .plan_runners(
            CONTROLLER,
            Box::new(move |snap| {
                let d = &snap.demand["kani"];
                assert_eq!(d.jobs(), 5);
                assert_eq!(d.queued.len(), 2, "{d:?}");
                assert_eq!(d.queued[&org()].jobs, 4);
                assert_eq!(d.queued[&RunnerScope::Repo("alice/proofs".into())].jobs, 1);
                let runner = |scope: RunnerScope, covers| NewRunner { scope, covers };
                vec![Launch {
                    profile: ProfileName::parse("kani").unwrap(),
                    runners: vec![
                        // acme's queue is jobs 1, 2, 4, 5: the oldest and the
                        // newest; alice's only job; a warm-pool runner.
                        runner(org(), Some(0)),
                        runner(org(), Some(3)),
                        runner(RunnerScope::Repo("alice/proofs".into()), Some(0)),
                        runner(org(), None),
                    ],
                }]
            }),
        )
        .await
        .unwrap();
    let since: Vec<_> = rows
        .iter()
        .map(|r| (r.scope.clone(), r.demand_since))
        .collect();
    assert_eq!(
        since,
        [
            (org(), Some(seen_at[0])),
            (org(), Some(seen_at[4])),
            (alice, Some(seen_at[2])),
            (org(), None),
        ]
    );
    let started = event(2, JobStatus::InProgress, None);
    record(s, &[delivery("s2", started, Ok("kani"))]).await;
    assert_eq!(s.job(4).await.unwrap().unwrap().queue_position, Some(3));
    assert_eq!(s.job(2).await.unwrap().unwrap().queue_position, None);
}

async fn claims_skip_leased_rows_and_leases_renew_and_lapse(t: &dyn Subject) {
    let s = t.store();
    let other = t.other_session().await;
    let names = plan_unclaimed(s.as_ref(), 4).await;
    let lease = Duration::from_secs(30);
    let (a, b) = tokio::join!(
        s.claim_provisioning(CONTROLLER, "a", lease, 3),
        other.claim_provisioning(CONTROLLER, "b", lease, 3),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.len() + b.len(), 4, "every row claimed once");
    let mut all: Vec<String> = a.iter().chain(&b).map(|r| r.name.clone()).collect();
    all.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(all, want, "no row claimed twice");
    assert!(s
        .claim_provisioning(CONTROLLER, "c", lease, 10)
        .await
        .unwrap()
        .is_empty());
    let mine: Vec<String> = a.iter().map(|r| r.name.clone()).collect();
    assert_eq!(
        s.renew_leases(&mine, "a", lease).await.unwrap(),
        mine.len() as u64
    );
    assert_eq!(
        s.renew_leases(&mine, "b", lease).await.unwrap(),
        0,
        "not b's"
    );
    // Only the lease holder moves a row it is provisioning.
    let booting = RunnerChange::Booting {
        instance_id: "i-b".into(),
        instance_type: "c6i.4xlarge".into(),
        subnet_id: None,
        market: "spot".into(),
    };
    assert!(!s.update_runner(&mine[0], "b", booting).await.unwrap());
    // A postponed row is free again after its short lease.
    assert!(s
        .update_runner(
            &mine[0],
            "a",
            RunnerChange::Postpone {
                retry_in: Duration::ZERO,
            },
        )
        .await
        .unwrap());
    t.advance(Duration::from_secs(1));
    let again = s
        .claim_provisioning(CONTROLLER, "c", lease, 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].name, mine[0]);
    // The lapsed holder cannot write over the new one's claim.
    let registered = RunnerChange::Registered {
        github_runner_id: 7,
    };
    assert!(!s.update_runner(&mine[0], "a", registered).await.unwrap());
    // Booting ends the claim: nothing left to provision.
    booting_by(s.as_ref(), "c", &mine[0], "i-1").await;
    assert_eq!(s.renew_leases(&mine[..1], "c", lease).await.unwrap(), 0);
}

async fn transitions_follow_the_lifecycle(t: &dyn Subject) {
    let s = t.store();
    let s = s.as_ref();
    let name = plan(s, 1).await.remove(0);
    s.update_runner(
        &name,
        OWNER,
        RunnerChange::Registered {
            github_runner_id: 5,
        },
    )
    .await
    .unwrap();
    assert_eq!(state(s, &name).await, RunnerState::Registered);
    s.update_runner(&name, OWNER, RunnerChange::Requeue)
        .await
        .unwrap();
    let r = &s.runners(CONTROLLER, Duration::ZERO).await.unwrap()[0];
    assert_eq!(
        (r.state, r.github_runner_id),
        (RunnerState::Requested, None)
    );
    s.update_runner(
        &name,
        OWNER,
        RunnerChange::Launching {
            instance_type: "c6i.4xlarge".into(),
            subnet_id: Some("subnet-a".into()),
            market: "spot".into(),
        },
    )
    .await
    .unwrap();
    s.update_runner(
        &name,
        OWNER,
        RunnerChange::AttemptFailed {
            code: "InsufficientInstanceCapacity".into(),
            message: "none left".into(),
        },
    )
    .await
    .unwrap();
    let r = &s.runners(CONTROLLER, Duration::ZERO).await.unwrap()[0];
    assert_eq!(r.state, RunnerState::Launching);
    assert_eq!(r.launch_attempts, 1);
    assert_eq!(
        r.last_error_code.as_deref(),
        Some("InsufficientInstanceCapacity")
    );
    booting(s, &name, "i-9").await;
    let r = &s.runners(CONTROLLER, Duration::ZERO).await.unwrap()[0];
    assert_eq!(
        (r.state, r.instance_id.as_deref()),
        (RunnerState::Booting, Some("i-9"))
    );
    assert!(r.launched_at.is_some());
    // Booting ends provisioning: the provisioner can no longer end it…
    let ended = RunnerChange::Ended {
        state: RunnerState::LaunchFailed,
        code: None,
        reason: "gave up".into(),
    };
    assert!(!s.update_runner(&name, OWNER, ended).await.unwrap());
    // …only a sweep can, conditionally.
    assert!(s
        .end_runner_if(
            &name,
            RunnerState::Booting,
            RunnerState::LaunchFailed,
            "gave up"
        )
        .await
        .unwrap());
    assert!(s
        .runners(CONTROLLER, Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    let recent = s
        .runners(CONTROLLER, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        recent[0].last_error_code.as_deref(),
        Some("InsufficientInstanceCapacity")
    );
    assert_eq!(recent[0].reason.as_deref(), Some("gave up"));
    let missing = s
        .update_runner("nobody", OWNER, RunnerChange::Requeue)
        .await;
    assert!(matches!(missing, Ok(false)), "{missing:?}");
}

async fn jobs_settle_runners_and_each_completion_is_claimed_once(t: &dyn Subject) {
    let s = t.store();
    let other = t.other_session().await;
    let names = plan(s.as_ref(), 2).await;
    booting(s.as_ref(), &names[0], "i-1").await;
    booting(s.as_ref(), &names[1], "i-2").await;
    record(
        s.as_ref(),
        &[delivery(
            "p",
            event(1, JobStatus::InProgress, Some(&names[0])),
            Ok("kani"),
        )],
    )
    .await;
    assert!(s.settle_jobs(CONTROLLER).await.unwrap().is_empty());
    assert_eq!(state(s.as_ref(), &names[0]).await, RunnerState::Busy);
    assert_eq!(state(s.as_ref(), &names[1]).await, RunnerState::Booting);
    record(
        s.as_ref(),
        &[delivery(
            "c",
            event(1, JobStatus::Completed, Some(&names[0])),
            Ok("kani"),
        )],
    )
    .await;
    let (a, b) = tokio::join!(s.settle_jobs(CONTROLLER), other.settle_jobs(CONTROLLER));
    let claimed: Vec<_> = a.unwrap().into_iter().chain(b.unwrap()).collect();
    assert_eq!(claimed.len(), 1, "one caller terminates it");
    let (runner, completed_at) = &claimed[0];
    assert_eq!(runner.name, names[0]);
    assert_eq!(runner.job_id, Some(1));
    assert!(completed_at.is_some());
    assert_eq!(state(s.as_ref(), &names[0]).await, RunnerState::Terminating);
}

/// A pass settles the jobs written since the last one, and only those: a
/// job that names its runner only after it had completed is one of them.
async fn settling_reads_what_changed_a_late_runner_name_included(t: &dyn Subject) {
    let s = t.store();
    let names = plan(s.as_ref(), 3).await;
    for (i, name) in names.iter().enumerate() {
        booting(s.as_ref(), name, &format!("i-{i}")).await;
    }
    // Job 2 completes on no runner of ours (as far as anyone knows yet).
    record(
        s.as_ref(),
        &[delivery(
            "c2",
            event(2, JobStatus::Completed, None),
            Ok("kani"),
        )],
    )
    .await;
    assert!(s.settle_jobs(CONTROLLER).await.unwrap().is_empty());
    t.advance(Duration::from_secs(20));
    record(
        s.as_ref(),
        &[delivery(
            "s1",
            event(1, JobStatus::InProgress, Some(&names[0])),
            Ok("kani"),
        )],
    )
    .await;
    assert!(s.settle_jobs(CONTROLLER).await.unwrap().is_empty());
    assert_eq!(state(s.as_ref(), &names[0]).await, RunnerState::Busy);
    t.advance(Duration::from_secs(20));
    record(
        s.as_ref(),
        &[delivery(
            "c1",
            event(1, JobStatus::Completed, Some(&names[0])),
            Ok("kani"),
        )],
    )
    .await;
    let done = s.settle_jobs(CONTROLLER).await.unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0.name, names[0]);
    // A late `in_progress` names job 2's runner, 55 s after it completed:
    // the row it writes is a change like any other, settled at once.
    t.advance(Duration::from_secs(15));
    record(
        s.as_ref(),
        &[delivery(
            "s2",
            event(2, JobStatus::InProgress, Some(&names[1])),
            Ok("kani"),
        )],
    )
    .await;
    let ended: Vec<String> = s
        .settle_jobs(CONTROLLER)
        .await
        .unwrap()
        .into_iter()
        .map(|(r, _)| r.name)
        .collect();
    assert_eq!(ended, [names[1].clone()], "settled at once");
    t.advance(Duration::from_secs(10));
    assert!(
        s.settle_jobs(CONTROLLER).await.unwrap().is_empty(),
        "and once"
    );
    assert_eq!(state(s.as_ref(), &names[1]).await, RunnerState::Terminating);
    assert_eq!(state(s.as_ref(), &names[2]).await, RunnerState::Booting);
}

async fn listings_mark_runners_online_and_busy_and_reaps_are_conditional(t: &dyn Subject) {
    let s = t.store();
    let s = s.as_ref();
    let names = plan(s, 3).await;
    for (i, n) in names.iter().enumerate() {
        booting(s, n, &format!("i-{i}")).await;
    }
    let at = chrono::Utc::now();
    let online = [names[0].clone(), names[1].clone(), "stranger".into()];
    assert_eq!(
        s.mark_online("spot-runners-staging", &online, at)
            .await
            .unwrap(),
        0,
        "another deployment's listing moves none of ours"
    );
    assert_eq!(
        s.mark_busy("spot-runners-staging", &names, at)
            .await
            .unwrap(),
        0
    );
    assert_eq!(s.mark_online(CONTROLLER, &online, at).await.unwrap(), 2);
    assert_eq!(
        s.mark_online(CONTROLLER, &online, at).await.unwrap(),
        0,
        "already idle"
    );
    assert_eq!(s.mark_busy(CONTROLLER, &names[1..], at).await.unwrap(), 2);
    assert_eq!(state(s, &names[0]).await, RunnerState::Idle);
    assert_eq!(state(s, &names[1]).await, RunnerState::Busy);
    assert_eq!(state(s, &names[2]).await, RunnerState::Busy);
    let idle = s.runners(CONTROLLER, Duration::ZERO).await.unwrap();
    assert!(idle.iter().all(|r| r.online_at.is_some()));
    // The reap saw it idle; it is still idle: it ends.
    assert!(s
        .end_runner_if(
            &names[0],
            RunnerState::Idle,
            RunnerState::IdleTimeout,
            "reaped"
        )
        .await
        .unwrap());
    // The reap saw it idle, but it became busy: nothing changes.
    assert!(!s
        .end_runner_if(
            &names[1],
            RunnerState::Idle,
            RunnerState::IdleTimeout,
            "reaped"
        )
        .await
        .unwrap());
    assert_eq!(state(s, &names[0]).await, RunnerState::IdleTimeout);
    assert_eq!(state(s, &names[1]).await, RunnerState::Busy);
    let states = s
        .runner_states(CONTROLLER, &[names[0].clone(), "unknown".into()])
        .await
        .unwrap();
    assert_eq!(states.len(), 1, "unknown names are absent");
    // Ended runners' scopes are remembered for a while.
    assert_eq!(
        s.runner_scopes(CONTROLLER, Duration::from_secs(3600))
            .await
            .unwrap(),
        [org()]
    );
}

async fn stale_jobs_are_due_by_the_rule_and_checks_move_status_forward(t: &dyn Subject) {
    let s = t.store();
    let s = s.as_ref();
    record(
        s,
        &[
            delivery("a", event(1, JobStatus::Queued, None), Ok("kani")),
            delivery("b", event(2, JobStatus::Queued, None), Ok("bench")),
        ],
    )
    .await;
    let now = chrono::Utc::now();
    assert!(s
        .stale_jobs(&StaleCutoffs::at(now), &["kani".into()], 5)
        .await
        .unwrap()
        .is_empty());
    // An hour on: every queued job is backlog-due; oldest check first.
    let later = now + chrono::Duration::hours(1);
    let due = s
        .stale_jobs(&StaleCutoffs::at(later), &[], 5)
        .await
        .unwrap();
    assert_eq!(due.iter().map(|j| j.id).collect::<Vec<_>>(), [1, 2]);
    s.record_job_check(1, &JobCheck::Queued, later)
        .await
        .unwrap();
    let due = s
        .stale_jobs(&StaleCutoffs::at(later), &[], 5)
        .await
        .unwrap();
    assert_eq!(
        due.iter().map(|j| j.id).collect::<Vec<_>>(),
        [2],
        "1 was just checked"
    );
    assert_eq!(
        s.stale_jobs(&StaleCutoffs::at(later), &[], 0)
            .await
            .unwrap()
            .len(),
        0
    );
    // Suspects: a profile with an idle runner is asked about after 3 min.
    let soon_after = now + chrono::Duration::minutes(4);
    let suspects = s
        .stale_jobs(&StaleCutoffs::at(soon_after), &["bench".into()], 5)
        .await
        .unwrap();
    assert_eq!(suspects.iter().map(|j| j.id).collect::<Vec<_>>(), [2]);
    s.record_job_check(
        2,
        &JobCheck::Started {
            runner_name: Some("r".into()),
        },
        later,
    )
    .await
    .unwrap();
    s.record_job_check(2, &JobCheck::Queued, later)
        .await
        .unwrap();
    let job = s.job(2).await.unwrap().unwrap();
    assert_eq!(
        job.status,
        JobStatus::InProgress,
        "status only moves forward"
    );
    assert_eq!(job.runner_name.as_deref(), Some("r"));
    // PostgreSQL keeps microseconds.
    assert_eq!(
        job.checked_at.map(|t| t.timestamp_micros()),
        Some(later.timestamp_micros())
    );
    s.record_job_check(2, &JobCheck::Gone, later).await.unwrap();
    let job = s.job(2).await.unwrap().unwrap();
    assert_eq!(
        (job.status, job.conclusion.as_deref()),
        (JobStatus::Completed, Some("gone"))
    );
    assert!(job.completed_at.is_some());
}

async fn one_session_leads(t: &dyn Subject) {
    let s = t.store();
    let other = t.other_session().await;
    assert!(s.try_lead(CONTROLLER).await.unwrap());
    assert!(s.try_lead(CONTROLLER).await.unwrap(), "still the leader");
    assert!(!other.try_lead(CONTROLLER).await.unwrap());
    assert!(other.try_lead("another-deployment").await.unwrap());
}

async fn profiles_and_liveness(t: &dyn Subject) {
    let s = t.store();
    s.ping().await.unwrap();
    s.notify_wake().await.unwrap();
    assert!(s.profile_rows().await.unwrap().is_empty());
    let row = ProfileRow {
        instance_types: vec!["c6i.4xlarge".into()],
        image_id: Some("ami-1".into()),
        subnet_ids: vec!["subnet-a".into()],
        ..example_row("kani", &["linux", "kani"])
    };
    t.add_profile(row.clone()).await;
    let rows = s.profile_rows().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].name, row.name);
    assert_eq!(rows[0].labels, row.labels);
}

async fn ledger_is_pruned_past_retention_and_guids_are_known(t: &dyn Subject) {
    let s = t.store();
    let s = s.as_ref();
    record(
        s,
        &[
            delivery("a", event(1, JobStatus::Completed, None), Ok("kani")),
            delivery("b", event(2, JobStatus::Completed, None), Ok("kani")),
            delivery("c", event(3, JobStatus::Queued, None), Ok("kani")),
        ],
    )
    .await;
    let known = s
        .known_deliveries(&["a".into(), "c".into(), "zz".into()])
        .await
        .unwrap();
    assert_eq!(known.into_iter().collect::<Vec<_>>(), ["a", "c"]);
    let names = plan(s, 2).await;
    s.update_runner(
        &names[0],
        OWNER,
        RunnerChange::Ended {
            state: RunnerState::LaunchFailed,
            code: None,
            reason: "gave up".into(),
        },
    )
    .await
    .unwrap();
    // Nothing is old enough yet.
    let kept = s
        .prune_ledger(CONTROLLER, Duration::from_secs(3600), 10)
        .await
        .unwrap();
    assert_eq!((kept.jobs, kept.runners), (0, 0));
    // In batches, and never an open job or a live runner.
    let first = s.prune_ledger(CONTROLLER, Duration::ZERO, 1).await.unwrap();
    assert_eq!((first.jobs, first.runners), (1, 1));
    let rest = s
        .prune_ledger(CONTROLLER, Duration::ZERO, 10)
        .await
        .unwrap();
    assert_eq!((rest.jobs, rest.runners), (1, 0));
    assert!(s.job(1).await.unwrap().is_none());
    assert!(s.job(3).await.unwrap().is_some());
    let left = s
        .runners(CONTROLLER, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        left.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        [names[1].as_str()]
    );
}

fn run(attempt: i32, status: &str) -> spot_runners_domain::run::WorkflowRunEvent {
    spot_runners_domain::run::WorkflowRunEvent {
        run_id: 500,
        run_attempt: attempt,
        repository: "acme/proofs".into(),
        status: status.into(),
        conclusion: (status == "completed").then(|| "failure".into()),
        updated_at: None,
    }
}

/// A runner that took job 1 and was then ended by a spot reclaim; the
/// interruption is the caller's to record. `more` arrive with job 1's
/// deliveries.
async fn reclaimed_runner_of_job_1(s: &dyn Store, more: Vec<IncomingDelivery>) -> String {
    let name = plan(s, 1).await.remove(0);
    booting(s, &name, "i-1").await;
    let mut batch = vec![
        delivery("q", event(1, JobStatus::Queued, None), Ok("kani")),
        delivery(
            "p",
            event(1, JobStatus::InProgress, Some(&name)),
            Ok("kani"),
        ),
    ];
    batch.extend(more);
    record(s, &batch).await;
    s.settle_jobs(CONTROLLER).await.unwrap();
    assert_eq!(state(s, &name).await, RunnerState::Busy);
    assert_eq!(s.job_of_runner(&name).await.unwrap(), Some(1));
    assert!(s
        .end_runner_if(
            &name,
            RunnerState::Busy,
            RunnerState::Interrupted,
            "reclaimed"
        )
        .await
        .unwrap());
    name
}

async fn interruptions_lead_to_one_rerun_per_job_and_the_market_sees_them(t: &dyn Subject) {
    use spot_runners_domain::store::{MarketSnapshot, RerunOutcome};
    use spot_runners_domain::survival::Interruption;
    use spot_runners_domain::Market;
    use std::sync::Mutex;

    let s = t.store();
    let s = s.as_ref();
    t.add_profile(example_row("kani", &["linux", "kani"])).await;
    let mut failed = event(2, JobStatus::Completed, None);
    failed.name = "proof 1 lint".into();
    let name = reclaimed_runner_of_job_1(s, vec![delivery("f", failed, Ok("kani"))]).await;
    let now = chrono::Utc::now();
    let interruption = Interruption {
        job_id: 1,
        runner_name: name.clone(),
        instance_type: Some("c6i.4xlarge".into()),
        subnet_id: None,
        availability_zone: Some("us-east-1b".into()),
        market: Some(Market::Spot),
        ran_secs: 600,
        at: now,
    };
    assert!(s.record_interruption(&interruption).await.unwrap());
    assert!(
        !s.record_interruption(&interruption).await.unwrap(),
        "marked once"
    );
    let survival = s.job_survival(1).await.unwrap().unwrap();
    assert_eq!(
        survival.interrupted_at.map(|t| t.timestamp()),
        Some(now.timestamp())
    );
    assert_eq!(survival.interrupted_after_secs, Some(600));
    assert_eq!(survival.interrupted_az.as_deref(), Some("us-east-1b"));
    assert_eq!(survival.interrupted_subnet_id, None);
    assert_eq!(survival.rerun_state.as_deref(), Some("pending"));
    let since = now - chrono::Duration::hours(1);
    let reclaims = s.interruptions_since(CONTROLLER, since).await.unwrap();
    assert_eq!(reclaims.len(), 1);
    assert_eq!(reclaims[0].0, "kani");

    // Due, but its run is not known to have completed yet.
    let later = now + chrono::Duration::seconds(1);
    let due = s.runs_awaiting_reruns(later, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].run_id, due[0].completed()), (500, false));
    s.mark_run_checked(500, "acme/proofs", now).await.unwrap();
    assert_eq!(
        s.runs_awaiting_reruns(later, 10).await.unwrap()[0]
            .checked_at
            .map(|t| t.timestamp()),
        Some(now.timestamp())
    );
    assert_eq!(
        s.record_workflow_run("w", &run(1, "completed"))
            .await
            .unwrap(),
        DeliveryOutcome::Accepted
    );
    assert_eq!(
        s.record_workflow_run("w", &run(1, "completed"))
            .await
            .unwrap(),
        DeliveryOutcome::Duplicate
    );
    // A late `in_progress` of the same attempt changes nothing.
    s.record_run_check(&run(1, "in_progress"), now)
        .await
        .unwrap();
    assert!(s.runs_awaiting_reruns(later, 10).await.unwrap()[0].completed());

    let jobs = s.run_jobs(500).await.unwrap();
    assert_eq!(
        jobs.iter()
            .map(|j| (j.job_id, j.pending_rerun, j.lineage_reruns))
            .collect::<Vec<_>>(),
        [(1, true, 0), (2, false, 0)]
    );
    s.set_rerun_outcome(&[1], &RerunOutcome::Requested, later)
        .await
        .unwrap();
    assert_eq!(s.rerun_attempts(1).await.unwrap(), 1);
    assert!(s.runs_awaiting_reruns(later, 10).await.unwrap().is_empty());
    // Only pending jobs move.
    s.set_rerun_outcome(&[1], &RerunOutcome::Lost { reason: "x".into() }, later)
        .await
        .unwrap();
    assert_eq!(
        s.job_survival(1)
            .await
            .unwrap()
            .unwrap()
            .rerun_state
            .as_deref(),
        Some("requested")
    );

    // The re-run arrives as a job of attempt 2 and is linked to job 1.
    let mut rerun = event(3, JobStatus::Queued, None);
    (rerun.name, rerun.run_attempt) = ("proof 1".into(), 2);
    record(s, &[delivery("r", rerun, Ok("kani"))]).await;
    assert_eq!(s.link_reruns().await.unwrap(), 1);
    assert_eq!(s.link_reruns().await.unwrap(), 0);
    let linked = s.job_survival(3).await.unwrap().unwrap();
    assert_eq!((linked.rerun_of, linked.rerun_count), (Some(1), 1));
    let rerun = s.job_survival(1).await.unwrap().unwrap();
    assert_eq!(rerun.rerun_state.as_deref(), Some("rerun"));
    assert_eq!(rerun.rerun_reason.as_deref(), Some("re-run as job 3"));

    // The market choice sees the re-run demand and the reclaim, and its
    // decision is recorded on the runner. A decision that asks for the
    // on-demand count is asked again with it.
    let seen: Arc<Mutex<Vec<MarketSnapshot>>> = Arc::default();
    let into = Arc::clone(&seen);
    let next = plan(s, 1).await.remove(0);
    let (market, reason) = s
        .choose_runner_market(
            CONTROLLER,
            &next,
            "kani",
            MarketQuery {
                interruptions_since: since,
                with_durations: true,
            },
            Box::new(move |facts| {
                into.lock().unwrap().push(facts.clone());
                facts
                    .on_demand_available
                    .map(|_| (Market::OnDemand, "re-run of an interrupted job".into()))
            }),
        )
        .await
        .unwrap();
    assert_eq!(market, Market::OnDemand);
    let asked = seen.lock().unwrap().clone();
    assert_eq!(
        asked
            .iter()
            .map(|f| f.on_demand_available)
            .collect::<Vec<_>>(),
        [None, Some(0)]
    );
    let facts = asked[1].clone();
    assert_eq!(
        facts
            .queued
            .iter()
            .map(|q| (q.job_id, q.rerun_of_interrupted))
            .collect::<Vec<_>>(),
        [(3, true)]
    );
    assert_eq!(facts.interruptions.len(), 1);
    let row = s
        .runners(CONTROLLER, Duration::ZERO)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.name == next)
        .unwrap();
    assert_eq!(row.market.as_deref(), Some("on-demand"));
    assert_eq!(reason, "re-run of an interrupted job");

    // Durations: a job named "proof 9" ran 10 minutes; a new one is queued.
    // With durations it comes with that history; without, only re-runs are
    // read (a plain queued job cannot want on-demand then).
    let mut ran = event(20, JobStatus::InProgress, Some("r-20"));
    ran.name = "proof 9".into();
    record(s, &[delivery("h-start", ran.clone(), Ok("kani"))]).await;
    t.advance(Duration::from_secs(600));
    ran.status = JobStatus::Completed;
    ran.conclusion = Some("success".into());
    record(s, &[delivery("h-end", ran, Ok("kani"))]).await;
    record(
        s,
        &[delivery(
            "q9",
            event(9, JobStatus::Queued, None),
            Ok("kani"),
        )],
    )
    .await;
    let with = market_facts(s, &next, since, true).await;
    let facts: Vec<(i64, bool, Vec<f64>)> = with
        .queued
        .iter()
        .map(|q| {
            // Minutes to the second: the delivery batch's commit takes time.
            let minutes = q.history_minutes.iter().map(|m| (m * 60.0).round() / 60.0);
            (q.job_id, q.rerun_of_interrupted, minutes.collect())
        })
        .collect();
    assert_eq!(facts, [(3, true, vec![]), (9, false, vec![10.0])]);
    let without = market_facts(s, &next, since, false).await;
    assert_eq!(
        without.queued.iter().map(|q| q.job_id).collect::<Vec<_>>(),
        [3]
    );
}

/// The facts `choose_runner_market` decides on (the decision: spot).
async fn market_facts(
    s: &dyn Store,
    runner: &str,
    since: chrono::DateTime<chrono::Utc>,
    with_durations: bool,
) -> spot_runners_domain::store::MarketSnapshot {
    use std::sync::Mutex;
    let seen: Arc<Mutex<Option<_>>> = Arc::default();
    let into = Arc::clone(&seen);
    s.choose_runner_market(
        CONTROLLER,
        runner,
        "kani",
        MarketQuery {
            interruptions_since: since,
            with_durations,
        },
        Box::new(move |facts| {
            *into.lock().unwrap() = Some(facts.clone());
            Some((spot_runners_domain::Market::Spot, "spot".into()))
        }),
    )
    .await
    .unwrap();
    let facts = seen.lock().unwrap().take();
    facts.unwrap()
}

async fn provisioning_writes_are_compare_and_set(t: &dyn Subject) {
    let s = t.store();
    let s = s.as_ref();
    let names = plan(s, 3).await;
    let launching = || RunnerChange::Launching {
        instance_type: "c6i.4xlarge".into(),
        subnet_id: None,
        market: "spot".into(),
    };
    let booting = |id: &str| RunnerChange::Booting {
        instance_id: id.into(),
        instance_type: "c6i.4xlarge".into(),
        subnet_id: None,
        market: "spot".into(),
    };
    for n in &names {
        assert!(s.update_runner(n, OWNER, launching()).await.unwrap());
    }
    // A sweep ended the first while its RunInstances was in flight: the
    // late Booting changes nothing (its instance is an orphan now).
    assert!(s
        .end_runner_if(
            &names[0],
            RunnerState::Launching,
            RunnerState::Terminated,
            "gone"
        )
        .await
        .unwrap());
    assert!(!s
        .update_runner(&names[0], OWNER, booting("i-0"))
        .await
        .unwrap());
    let row = |name: &str| {
        let name = name.to_owned();
        async move {
            s.runners(CONTROLLER, Duration::from_secs(3600))
                .await
                .unwrap()
                .into_iter()
                .find(|r| r.name == name)
                .unwrap()
        }
    };
    let ended = row(&names[0]).await;
    assert_eq!(
        (ended.state, ended.instance_id),
        (RunnerState::Terminated, None)
    );
    // GitHub handed the second a job before Booting was written: it stays
    // busy and gets its instance, so it can still be ended.
    record(
        s,
        &[delivery(
            "p",
            event(1, JobStatus::InProgress, Some(&names[1])),
            Ok("kani"),
        )],
    )
    .await;
    s.settle_jobs(CONTROLLER).await.unwrap();
    assert_eq!(state(s, &names[1]).await, RunnerState::Busy);
    assert!(s
        .update_runner(&names[1], OWNER, booting("i-1"))
        .await
        .unwrap());
    let busy = row(&names[1]).await;
    assert_eq!(
        (busy.state, busy.instance_id.as_deref()),
        (RunnerState::Busy, Some("i-1"))
    );
    // Its job completes: now it is claimed for termination like any other.
    record(
        s,
        &[delivery(
            "c",
            event(1, JobStatus::Completed, Some(&names[1])),
            Ok("kani"),
        )],
    )
    .await;
    let done = s.settle_jobs(CONTROLLER).await.unwrap();
    assert_eq!(
        done.iter()
            .map(|(r, _)| r.name.as_str())
            .collect::<Vec<_>>(),
        [names[1].as_str()]
    );
    // Once the instance is recorded, a second Booting changes nothing.
    assert!(s
        .update_runner(&names[2], OWNER, booting("i-2"))
        .await
        .unwrap());
    assert!(!s
        .update_runner(&names[2], OWNER, booting("i-3"))
        .await
        .unwrap());
    assert_eq!(row(&names[2]).await.instance_id.as_deref(), Some("i-2"));
}

async fn spot_prices_are_recorded_and_usage_covers_the_window(t: &dyn Subject) {
    use spot_runners_domain::store::PRICE_SOURCE_EC2;
    use spot_runners_domain::Market;

    let s = t.store();
    let s = s.as_ref();
    let spot = |rows: Vec<spot_runners_domain::store::PriceRow>| {
        rows.into_iter()
            .filter(|r| r.market == "spot")
            .map(|r| (r.instance_type, r.dollars_per_hour, r.source))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        s.record_spot_prices(&[("c6i.4xlarge".into(), 0.25)])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        spot(s.prices().await.unwrap()),
        [("c6i.4xlarge".to_owned(), 0.25, PRICE_SOURCE_EC2.to_owned())]
    );
    // A later refresh replaces EC2's own rows.
    s.record_spot_prices(&[("c6i.4xlarge".into(), 0.3)])
        .await
        .unwrap();
    assert_eq!(spot(s.prices().await.unwrap())[0].1, 0.3);

    let start = chrono::Utc::now();
    let names = plan(s, 2).await;
    booting(s, &names[0], "i-1").await;
    t.advance(Duration::from_secs(3600));
    let window_end = start + chrono::Duration::hours(2);
    let used = s.usage(CONTROLLER, start, window_end).await.unwrap();
    assert_eq!(used.len(), 1, "only runners that had an instance: {used:?}");
    assert_eq!(used[0].instance_type.as_deref(), Some("c6i.4xlarge"));
    assert_eq!(used[0].market, Some(Market::Spot));
    assert_eq!(used[0].ended_at, None, "still running");
    // Nothing ran before the window.
    let before = start - chrono::Duration::hours(2);
    assert!(s
        .usage(CONTROLLER, before, before + chrono::Duration::hours(1))
        .await
        .unwrap()
        .is_empty());
}

async fn a_rerun_not_needed_is_terminal_and_not_a_loss(t: &dyn Subject) {
    use spot_runners_domain::cost::RerunFate;
    use spot_runners_domain::store::RerunOutcome;
    use spot_runners_domain::survival::Interruption;
    use spot_runners_domain::Market;

    let s = t.store();
    let s = s.as_ref();
    t.add_profile(example_row("kani", &["linux", "kani"])).await;
    let start = chrono::Utc::now();
    let name = reclaimed_runner_of_job_1(s, Vec::new()).await;
    let now = chrono::Utc::now();
    assert!(s
        .record_interruption(&Interruption {
            job_id: 1,
            runner_name: name.clone(),
            instance_type: Some("c6i.4xlarge".into()),
            subnet_id: Some("subnet-a".into()),
            availability_zone: Some("us-east-1c".into()),
            market: Some(Market::Spot),
            ran_secs: 60,
            at: now,
        })
        .await
        .unwrap());
    let reason = "not needed: GitHub reports the job finished well";
    s.set_rerun_outcome(
        &[1],
        &RerunOutcome::NotNeeded {
            reason: reason.into(),
        },
        now,
    )
    .await
    .unwrap();
    let survival = s.job_survival(1).await.unwrap().unwrap();
    assert_eq!(survival.rerun_state.as_deref(), Some("not_needed"));
    assert_eq!(survival.rerun_reason.as_deref(), Some(reason));
    assert_eq!(survival.rerun_attempts, 0, "no request was made");
    assert_eq!(survival.interrupted_az.as_deref(), Some("us-east-1c"));
    assert_eq!(survival.interrupted_subnet_id.as_deref(), Some("subnet-a"));
    // Terminal: never due again, and nothing moves it on.
    let later = now + chrono::Duration::hours(1);
    assert!(s.runs_awaiting_reruns(later, 10).await.unwrap().is_empty());
    s.set_rerun_outcome(&[1], &RerunOutcome::Lost { reason: "x".into() }, later)
        .await
        .unwrap();
    s.set_rerun_outcome(&[1], &RerunOutcome::Requested, later)
        .await
        .unwrap();
    let survival = s.job_survival(1).await.unwrap().unwrap();
    assert_eq!(survival.rerun_state.as_deref(), Some("not_needed"));
    assert_eq!(survival.rerun_attempts, 0);
    // The cost ledger sees the runner's fate as not needed, not lost.
    let used = s
        .usage(
            CONTROLLER,
            start - chrono::Duration::hours(1),
            start + chrono::Duration::hours(2),
        )
        .await
        .unwrap();
    assert_eq!(used.len(), 1, "{used:?}");
    assert_eq!(used[0].interrupted, Some(RerunFate::NotNeeded));
}
