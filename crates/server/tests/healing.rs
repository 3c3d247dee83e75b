//! Level-triggered healing, tried with random faults: webhooks lost,
//! duplicated and reordered, GitHub handing jobs to whichever runner is
//! free, jobs cancelled, instances shutting themselves down, and the
//! service crashing at random points. Whatever happened, once the sweeps
//! have had their few minutes (an injected clock, no waiting), the fleet is
//! exactly what GitHub's real queue justifies: one instance per queued job,
//! one per running job, and nothing else — and a further pass changes
//! nothing.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::fleet::Harness;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use spot_runners_domain::ports::{GitHubJob, JobReport};
use spot_runners_domain::{JobStatus, WorkflowJobEvent};
use spot_runners_reconciler::Reconciler;
use spot_runners_store::{IncomingDelivery, PgStore, Store};

const REPO: &str = "acme/proofs";
const JOBS: i64 = 12;

fn labels() -> Vec<String> {
    ["self-hosted", "linux", "x64", "kani"]
        .map(str::to_owned)
        .to_vec()
}

/// What GitHub knows about a job: the truth the ledger has to converge to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Truth {
    Queued,
    Running(String),
    Done,
}

/// One replica's life: its own pool (its own sessions, so its leadership
/// lock dies with it) and its own reconciler.
struct Process {
    reconciler: Arc<Reconciler>,
}

impl Process {
    async fn start(h: &Harness) -> Self {
        let store = Arc::new(PgStore::connect(&h._db.url).await.unwrap());
        Self {
            reconciler: h.reconciler_on(store, 100),
        }
    }

    async fn reconcile(&self) {
        self.reconciler.sweep().await.unwrap();
        self.reconciler.pass().await.unwrap();
        while self.reconciler.provision_batch().await.unwrap() > 0 {}
    }
}

fn event(
    id: i64,
    status: JobStatus,
    runner: Option<&str>,
    conclusion: Option<&str>,
) -> WorkflowJobEvent {
    WorkflowJobEvent {
        job_id: id,
        run_id: 500,
        run_attempt: 1,
        status,
        name: format!("proof {id}"),
        workflow_name: Some("Kani".into()),
        labels: labels(),
        conclusion: conclusion.map(str::to_owned),
        runner_id: runner.map(|_| 1),
        runner_name: runner.map(str::to_owned),
        repository: REPO.into(),
        owner: "acme".into(),
        org: Some("acme".into()),
        installation_id: None,
        html_url: None,
        created_at: None,
        started_at: None,
        completed_at: None,
    }
}

/// GitHub's deliveries for one step, as they arrive: some lost, some twice
/// (same GUID), in any order.
async fn deliver(h: &Harness, rng: &mut StdRng, step: &str, events: Vec<WorkflowJobEvent>) {
    let mut out = Vec::new();
    for (i, e) in events.into_iter().enumerate() {
        let d = IncomingDelivery {
            delivery_id: format!("{step}-{i}"),
            job: e,
            profile: Ok("kani".into()),
        };
        match rng.gen_range(0..10) {
            0..=2 => {}                      // lost
            3 => out.extend([d.clone(), d]), // redelivered
            _ => out.push(d),
        }
    }
    out.shuffle(rng);
    for d in out {
        h.store
            .record_deliveries(
                &[d],
                (tokio::time::Instant::now() + Duration::from_secs(10)).into_std(),
            )
            .await
            .unwrap();
    }
}

fn set_truth(h: &Harness, truth: &BTreeMap<i64, Truth>, id: i64, conclusion: Option<&str>) {
    let (status, runner) = match &truth[&id] {
        Truth::Queued => ("queued", None),
        Truth::Running(r) => ("in_progress", Some(r.clone())),
        Truth::Done => ("completed", None),
    };
    h.github.set_job(
        REPO,
        id,
        JobReport {
            status: status.into(),
            conclusion: conclusion.map(str::to_owned),
            runner_name: runner,
        },
    );
}

async fn scenario(seed: u64) {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 50").await;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut truth: BTreeMap<i64, Truth> = BTreeMap::new();
    let long_ago = Utc::now() - chrono::Duration::minutes(10);
    for id in 0..JOBS {
        h.github.queue_job(
            REPO,
            GitHubJob {
                id,
                run_id: 500,
                run_attempt: 1,
                name: format!("proof {id}"),
                workflow_name: Some("Kani".into()),
                labels: labels(),
                html_url: None,
                created_at: Some(long_ago),
            },
        );
        truth.insert(id, Truth::Queued);
    }
    // The ledger has seen this repository before (polling looks there).
    deliver(
        &h,
        &mut StdRng::seed_from_u64(u64::MAX),
        "seen",
        vec![event(1000, JobStatus::Completed, None, Some("success"))],
    )
    .await;

    let mut process = Process::start(&h).await;
    let crash_at = rng.gen_range(0..4);
    let events = (0..JOBS)
        .map(|id| event(id, JobStatus::Queued, None, None))
        .collect();
    deliver(&h, &mut rng, "queued", events).await;
    process.reconcile().await;
    if crash_at == 0 {
        process = Process::start(&h).await;
    }

    // GitHub hands queued jobs, oldest first, to whichever runners are
    // online — not the ones launched for them.
    let mut started = Vec::new();
    for runner in h.github.runners() {
        h.github.set_online(&runner.name, true);
        let next = truth
            .iter()
            .find(|(_, t)| **t == Truth::Queued)
            .map(|(id, _)| *id);
        if let (Some(id), true) = (next, rng.gen_bool(0.7)) {
            truth.insert(id, Truth::Running(runner.name.clone()));
            set_truth(&h, &truth, id, None);
            h.github.set_busy(&runner.name, true);
            started.push(event(id, JobStatus::InProgress, Some(&runner.name), None));
        }
    }
    deliver(&h, &mut rng, "started", started).await;
    process.reconcile().await;
    if crash_at == 1 {
        process = Process::start(&h).await;
    }

    // Some jobs finish (the JIT runner leaves GitHub, the instance may
    // power itself off), some queued ones are cancelled.
    let mut finished = Vec::new();
    for (id, t) in truth.clone() {
        match t {
            Truth::Running(runner) if rng.gen_bool(0.5) => {
                truth.insert(id, Truth::Done);
                set_truth(&h, &truth, id, Some("success"));
                h.github.deregister(&runner);
                if rng.gen_bool(0.5) {
                    let instance = h
                        .cloud
                        .instances()
                        .into_iter()
                        .find(|i| i.request.runner_name == runner)
                        .map(|i| i.instance.id);
                    if let Some(instance) = instance {
                        h.cloud.shutdown_from_inside(&instance);
                    }
                }
                finished.push(event(
                    id,
                    JobStatus::Completed,
                    Some(&runner),
                    Some("success"),
                ));
            }
            Truth::Queued if rng.gen_bool(0.2) => {
                truth.insert(id, Truth::Done);
                set_truth(&h, &truth, id, Some("cancelled"));
                finished.push(event(id, JobStatus::Completed, None, Some("cancelled")));
            }
            _ => {}
        }
    }
    deliver(&h, &mut rng, "finished", finished).await;
    if crash_at == 2 {
        process = Process::start(&h).await;
    }

    // The world stands still; the sweeps get their minutes. Runners whose
    // instance exists come online (GitHub lists them).
    for _ in 0..12 {
        h.clock.advance(Duration::from_secs(150));
        process.reconcile().await;
        for runner in h.github.runners() {
            if !runner.online {
                h.github.set_online(&runner.name, true);
            }
        }
    }
    if crash_at == 3 {
        process = Process::start(&h).await;
        h.clock.advance(Duration::from_secs(150));
        process.reconcile().await;
    }

    let queued = truth.values().filter(|t| **t == Truth::Queued).count();
    let running: Vec<&String> = truth
        .values()
        .filter_map(|t| match t {
            Truth::Running(r) => Some(r),
            _ => None,
        })
        .collect();
    let check = |when: &str| {
        let live: Vec<String> = h
            .cloud
            .instances()
            .into_iter()
            .filter(|i| i.instance.state.is_alive())
            .map(|i| i.request.runner_name)
            .collect();
        assert_eq!(
            live.len(),
            queued + running.len(),
            "seed {seed} {when}: {queued} queued and {} running jobs, live instances {live:?}, truth {truth:?}",
            running.len()
        );
        for r in &running {
            assert!(
                live.contains(r),
                "seed {seed} {when}: the runner of a running job lives"
            );
        }
    };
    check("after healing");
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM runners WHERE state IN ('requested', 'registered', 'launching') GROUP BY state")
            .fetch_all(h.store.pool())
            .await
            .unwrap();
    assert!(
        states.is_empty(),
        "seed {seed}: nothing left mid-provisioning: {states:?}"
    );
    // Settled: another pass launches and terminates nothing.
    let calls = h.cloud.calls().len();
    h.clock.advance(Duration::from_secs(150));
    process.reconcile().await;
    check("one more pass later");
    assert_eq!(
        h.cloud.calls().len(),
        calls,
        "seed {seed}: a settled fleet stays put"
    );
    // GitHub keeps no registration the fleet does not account for.
    let registered = h.github.runners().len();
    assert_eq!(
        registered,
        queued + running.len(),
        "seed {seed}: registrations {:?}",
        h.github
            .runners()
            .iter()
            .map(|r| &r.name)
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn faults_and_crashes_heal_to_exactly_the_justified_fleet() {
    for seed in 0..6 {
        scenario(seed).await;
    }
}
