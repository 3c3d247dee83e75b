//! Spot survival on the fake cloud and fake GitHub, against a real
//! PostgreSQL, with an injected clock: a reclaim of a busy runner's
//! instance marks its job interrupted; once the run completes (webhook or
//! GitHub's runs API) every interrupted job is re-run — and only those —
//! and the re-run's demand is served on-demand.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fleet::Harness;
use spot_runners::reruns::RerunWorker;
use spot_runners_domain::ports::{GitHubError, JobReport};
use spot_runners_domain::run::WorkflowRunEvent;
use spot_runners_domain::survival::Interruption;
use spot_runners_domain::{JobStatus, Market, WorkflowJobEvent};
use spot_runners_reconciler::Reconciler;
use spot_runners_sim::cloud::CloudCall;
use spot_runners_sim::github::GitHubCall;
use spot_runners_store::{IncomingDelivery, Store};

const REPO: &str = "acme/proofs";

fn event(
    id: i64,
    run_id: i64,
    attempt: i32,
    name: &str,
    status: JobStatus,
    runner: Option<&str>,
    conclusion: Option<&str>,
) -> WorkflowJobEvent {
    WorkflowJobEvent {
        job_id: id,
        run_id,
        run_attempt: attempt,
        status,
        name: name.into(),
        workflow_name: Some("Kani".into()),
        labels: ["self-hosted", "linux", "x64", "kani"]
            .map(str::to_owned)
            .to_vec(),
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

async fn deliver(h: &Harness, events: Vec<WorkflowJobEvent>) {
    let batch: Vec<IncomingDelivery> = events
        .into_iter()
        .map(|e| IncomingDelivery {
            delivery_id: format!("{}-{}-{}", e.job_id, e.status, e.run_attempt),
            job: e,
            profile: Ok("kani".into()),
        })
        .collect();
    h.store
        .record_deliveries(&batch, std::time::Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
}

fn worker(h: &Harness) -> RerunWorker {
    RerunWorker::new(
        h.store.clone(),
        Arc::new(h.github.clone()),
        h.profiles.clone(),
        h.metrics.clone(),
        "spot-runners".into(),
        Arc::new(h.clock.clone()),
    )
}

async fn step(h: &Harness, r: &Arc<Reconciler>) {
    h.clock.advance(Duration::from_secs(15));
    h.reconcile(r).await;
}

fn done(conclusion: &str) -> JobReport {
    JobReport {
        status: "completed".into(),
        conclusion: Some(conclusion.into()),
        runner_name: None,
    }
}

fn rerun_calls(h: &Harness) -> Vec<GitHubCall> {
    h.github
        .calls()
        .into_iter()
        .filter(|c| {
            matches!(
                c,
                GitHubCall::RerunJob { .. } | GitHubCall::RerunFailedJobs { .. }
            )
        })
        .collect()
}

async fn job_state(h: &Harness, id: i64) -> (Option<String>, Option<String>) {
    let s = h.store.job_survival(id).await.unwrap().unwrap();
    (s.rerun_state, s.rerun_reason)
}

/// Starts `names` as jobs 1..=n of run `run_id` on runners the reconciler
/// launched, and returns `(job id, runner name, instance id)`.
async fn start_run(
    h: &Harness,
    r: &Arc<Reconciler>,
    run_id: i64,
    names: &[&str],
) -> Vec<(i64, String, String)> {
    let jobs: Vec<(i64, &str)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (i as i64 + 1, *n))
        .collect();
    h.github.add_run(REPO, run_id, &jobs);
    deliver(
        h,
        jobs.iter()
            .map(|(id, n)| event(*id, run_id, 1, n, JobStatus::Queued, None, None))
            .collect(),
    )
    .await;
    step(h, r).await;
    let instances = h.cloud.live_instances();
    assert_eq!(instances.len(), names.len());
    let mut started = Vec::new();
    let mut events = Vec::new();
    for ((id, name), i) in jobs.iter().zip(instances) {
        h.github.set_online(&i.runner_name, true);
        h.github.set_busy(&i.runner_name, true);
        h.github.set_job(
            REPO,
            *id,
            JobReport {
                status: "in_progress".into(),
                conclusion: None,
                runner_name: Some(i.runner_name.clone()),
            },
        );
        events.push(event(
            *id,
            run_id,
            1,
            name,
            JobStatus::InProgress,
            Some(&i.runner_name),
            None,
        ));
        started.push((*id, i.runner_name.clone(), i.id.clone()));
    }
    deliver(h, events).await;
    step(h, r).await;
    started
}

#[tokio::test]
async fn three_reclaimed_matrix_jobs_are_all_rerun_on_demand_without_a_webhook() {
    let h = Harness::new().await;
    // A breaker that does not trip here: the re-runs alone ask for on-demand.
    h.profile("kani", "spot_breaker_interruptions = 10").await;
    let r = h.reconciler(100);
    let names = ["proof (1)", "proof (2)", "proof (3)", "proof (4)"];
    let started = start_run(&h, &r, 700, &names).await;

    // EC2 reclaims three busy runners' instances; the fourth job succeeds.
    for (_, _, instance) in &started[..3] {
        assert!(h.cloud.interrupt(instance));
    }
    h.github.set_job(REPO, 4, done("success"));
    deliver(
        &h,
        vec![event(
            4,
            700,
            1,
            names[3],
            JobStatus::Completed,
            Some(&started[3].1),
            Some("success"),
        )],
    )
    .await;
    step(&h, &r).await;

    for (id, runner, _) in &started[..3] {
        let s = h.store.job_survival(*id).await.unwrap().unwrap();
        assert!(s.interrupted_at.is_some(), "job {id} is interrupted");
        assert_eq!(s.interrupted_runner.as_deref(), Some(runner.as_str()));
        assert_eq!(s.interrupted_market.as_deref(), Some("spot"));
        assert!(s.interrupted_instance_type.is_some() && s.interrupted_subnet_id.is_some());
        // The fake cloud places each subnet in one AZ, as EC2 does.
        let az = spot_runners_sim::cloud::availability_zone_of(s.interrupted_subnet_id.as_deref());
        assert_eq!(s.interrupted_az.as_deref(), Some(az));
        assert_eq!(s.rerun_state.as_deref(), Some("pending"));
    }
    assert_eq!(
        h.store
            .job_survival(4)
            .await
            .unwrap()
            .unwrap()
            .interrupted_at,
        None
    );
    assert_eq!(
        h.metrics
            .interruptions_total
            .with_label_values(&["kani"])
            .get(),
        3
    );

    // The run is not over yet: nothing is re-run.
    let w = worker(&h);
    w.pass().await.unwrap().unwrap();
    assert!(rerun_calls(&h).is_empty());

    // GitHub fails the three jobs it lost; the run completes. Its
    // workflow_run delivery is lost: the worker asks GitHub.
    for (id, _, _) in &started[..3] {
        h.github.set_job(REPO, *id, done("failure"));
    }
    h.clock.advance(Duration::from_secs(31));
    let report = w.pass().await.unwrap().unwrap();
    assert_eq!(report.requested, 3);
    let calls = rerun_calls(&h);
    assert_eq!(
        calls.len(),
        1,
        "one rerun-failed-jobs for all three: {calls:?}"
    );
    assert!(matches!(
        &calls[0],
        GitHubCall::RerunFailedJobs { run_id: 700, .. }
    ));
    for (id, _, _) in &started[..3] {
        assert_eq!(job_state(&h, *id).await.0.as_deref(), Some("requested"));
    }
    assert_eq!(
        h.metrics
            .reruns_total
            .with_label_values(&["kani", "requested"])
            .get(),
        3
    );

    // The new attempt's jobs arrive; each is linked to the job it re-runs,
    // and their runners are launched on-demand.
    let run = h.github.run(REPO, 700).unwrap();
    assert_eq!(run.attempt, 2);
    let reruns: Vec<(i64, String)> = run
        .jobs
        .iter()
        .filter(|j| j.2 == 2)
        .map(|j| (j.0, j.1.clone()))
        .collect();
    assert_eq!(reruns.len(), 3);
    let launches_before = h.cloud.calls().len();
    deliver(
        &h,
        reruns
            .iter()
            .map(|(id, n)| event(*id, 700, 2, n, JobStatus::Queued, None, None))
            .collect(),
    )
    .await;
    assert_eq!(w.pass().await.unwrap().unwrap().linked, 3);
    for (id, _, _) in &started[..3] {
        assert_eq!(job_state(&h, *id).await.0.as_deref(), Some("rerun"));
    }
    for (id, _) in &reruns {
        let s = h.store.job_survival(*id).await.unwrap().unwrap();
        assert_eq!(s.rerun_count, 1);
        assert!(s.rerun_of.is_some());
    }
    step(&h, &r).await;
    let launched: Vec<Market> = h.cloud.calls()[launches_before..]
        .iter()
        .filter_map(|c| match c {
            CloudCall::Launch {
                market,
                outcome: Ok(_),
                ..
            } => Some(*market),
            _ => None,
        })
        .collect();
    assert_eq!(
        launched,
        vec![Market::OnDemand; 3],
        "re-runs launch on-demand"
    );
    let reasons: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT market, market_reason FROM runners WHERE state NOT IN ('interrupted', 'terminated', 'terminating', 'done') ORDER BY name",
    )
    .fetch_all(h.store.pool())
    .await
    .unwrap();
    assert_eq!(reasons.len(), 3);
    for (market, reason) in reasons {
        assert_eq!(market, "on-demand");
        assert!(reason
            .unwrap()
            .contains("re-runs a job a spot reclaim interrupted"));
    }
}

#[tokio::test]
async fn the_breaker_sends_a_profile_on_demand_after_two_reclaims() {
    let h = Harness::new().await;
    h.profile("kani", "rerun_market = 'spot'").await;
    let r = h.reconciler(100);
    let started = start_run(&h, &r, 900, &["a", "b"]).await;
    for (_, _, instance) in &started {
        assert!(h.cloud.interrupt(instance));
    }
    step(&h, &r).await;
    // New demand after the reclaims.
    deliver(
        &h,
        vec![event(50, 901, 1, "c", JobStatus::Queued, None, None)],
    )
    .await;
    let before = h.cloud.calls().len();
    step(&h, &r).await;
    let market: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT market, market_reason FROM runners WHERE state = 'booting'")
            .fetch_all(h.store.pool())
            .await
            .unwrap();
    assert_eq!(market.len(), 1);
    assert_eq!(market[0].0, "on-demand");
    assert!(market[0]
        .1
        .as_deref()
        .unwrap()
        .contains("spot breaker open"));
    assert!(h.cloud.calls().len() > before);
    worker(&h).pass().await.unwrap();
    assert_eq!(
        h.metrics
            .spot_breaker_open
            .with_label_values(&["kani"])
            .get(),
        1
    );
}

/// A ledger-only run: jobs as GitHub's deliveries left them, `interrupted`
/// the ones a reclaim killed.
async fn ledger_run(h: &Harness, run_id: i64, jobs: &[(i64, &str, &str, bool)]) {
    let mut gh = Vec::new();
    for (id, name, conclusion, interrupted) in jobs {
        gh.push((*id, *name));
        deliver(
            h,
            vec![event(
                *id,
                run_id,
                1,
                name,
                JobStatus::Completed,
                Some("r"),
                Some(conclusion),
            )],
        )
        .await;
        if *interrupted {
            h.store
                .record_interruption(&Interruption {
                    job_id: *id,
                    runner_name: "spot-runners-kani-x".into(),
                    instance_type: Some("c6i.4xlarge".into()),
                    subnet_id: Some("subnet-a".into()),
                    availability_zone: Some("us-east-1a".into()),
                    market: Some(Market::Spot),
                    ran_secs: 3600,
                    at: chrono::Utc::now(),
                })
                .await
                .unwrap();
        }
    }
    h.github.add_run(REPO, run_id, &gh);
    for (id, _, conclusion, _) in jobs {
        h.github.set_job(REPO, *id, done(conclusion));
    }
}

async fn run_completed_webhook(h: &Harness, run_id: i64) {
    h.store
        .record_workflow_run(
            &format!("run-{run_id}"),
            &WorkflowRunEvent {
                run_id,
                run_attempt: 1,
                repository: REPO.into(),
                status: "completed".into(),
                conclusion: Some("failure".into()),
                updated_at: None,
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_job_that_failed_on_its_own_is_not_rerun() {
    let h = Harness::new().await;
    h.profile("kani", "market = 'spot'").await;
    ledger_run(
        &h,
        800,
        &[
            (1, "x", "failure", true),
            (2, "y", "failure", false),
            (3, "z", "failure", true),
        ],
    )
    .await;
    run_completed_webhook(&h, 800).await;
    let w = worker(&h);
    w.pass().await.unwrap().unwrap();
    let calls = rerun_calls(&h);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(matches!(&calls[0], GitHubCall::RerunJob { job_id: 1, .. }));
    assert!(
        !h.github
            .calls()
            .iter()
            .any(|c| matches!(c, GitHubCall::WorkflowRun { .. })),
        "the webhook said the run completed: GitHub is not asked"
    );
    assert_eq!(job_state(&h, 1).await.0.as_deref(), Some("requested"));
    let (state, reason) = job_state(&h, 3).await;
    assert_eq!(state.as_deref(), Some("pending"));
    assert!(reason.unwrap().contains("failed on its own"));
    assert_eq!(job_state(&h, 2).await.0, None, "job 2 is not touched");

    // The re-run of job 1 completes; then job 3 is re-run.
    let new_id = h.github.run(REPO, 800).unwrap().jobs[0].0;
    deliver(
        &h,
        vec![event(
            new_id,
            800,
            2,
            "x",
            JobStatus::Completed,
            Some("r2"),
            Some("success"),
        )],
    )
    .await;
    h.github.set_job(REPO, new_id, done("success"));
    h.clock.advance(Duration::from_secs(31));
    w.pass().await.unwrap().unwrap();
    let calls = rerun_calls(&h);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(matches!(&calls[1], GitHubCall::RerunJob { job_id: 3, .. }));
    assert_eq!(job_state(&h, 1).await.0.as_deref(), Some("rerun"));
}

#[tokio::test]
async fn refusals_are_retried_later_or_given_up_with_a_reason_never_in_a_loop() {
    let h = Harness::new().await;
    h.profile("kani", "market = 'spot'").await;
    ledger_run(&h, 810, &[(1, "x", "failure", true)]).await;
    run_completed_webhook(&h, 810).await;
    // GitHub still has a job of the run going (a re-run someone started).
    h.github.add_run(REPO, 810, &[(1, "x"), (2, "y")]);
    let w = worker(&h);
    w.pass().await.unwrap().unwrap();
    let (state, reason) = job_state(&h, 1).await;
    assert_eq!(state.as_deref(), Some("pending"));
    assert!(reason.unwrap().contains("running again"), "explained");
    // Not due yet: no call.
    w.pass().await.unwrap().unwrap();
    assert_eq!(rerun_calls(&h).len(), 1);
    // Later GitHub refuses for good.
    h.clock.advance(Duration::from_secs(61));
    h.github.fail_next(GitHubError::Refused(
        "rerun_job: 403 Forbidden: Resource not accessible by integration".into(),
    ));
    w.pass().await.unwrap().unwrap();
    let (state, reason) = job_state(&h, 1).await;
    assert_eq!(state.as_deref(), Some("lost"));
    assert!(reason.unwrap().contains("not accessible by integration"));
    assert_eq!(
        h.metrics.jobs_lost_total.with_label_values(&["kani"]).get(),
        1
    );
    h.clock.advance(Duration::from_secs(3600));
    w.pass().await.unwrap().unwrap();
    assert_eq!(
        rerun_calls(&h).len(),
        2,
        "a lost job is not asked about again"
    );
}

#[tokio::test]
async fn at_most_max_interruption_reruns_per_job() {
    let h = Harness::new().await;
    h.profile("kani", "max_interruption_reruns = 1").await;
    ledger_run(&h, 820, &[(1, "x", "failure", true)]).await;
    run_completed_webhook(&h, 820).await;
    let w = worker(&h);
    w.pass().await.unwrap().unwrap();
    // The re-run is interrupted too.
    let new_id = h.github.run(REPO, 820).unwrap().jobs[0].0;
    deliver(
        &h,
        vec![event(
            new_id,
            820,
            2,
            "x",
            JobStatus::Completed,
            Some("r2"),
            Some("failure"),
        )],
    )
    .await;
    h.github.set_job(REPO, new_id, done("failure"));
    h.store
        .record_interruption(&Interruption {
            job_id: new_id,
            runner_name: "spot-runners-kani-y".into(),
            instance_type: None,
            subnet_id: None,
            availability_zone: None,
            market: Some(Market::OnDemand),
            ran_secs: 60,
            at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(31));
    w.pass().await.unwrap().unwrap();
    assert_eq!(rerun_calls(&h).len(), 1, "no second re-run");
    let (state, reason) = job_state(&h, new_id).await;
    assert_eq!(state.as_deref(), Some("lost"));
    assert!(reason.unwrap().contains("max_interruption_reruns = 1"));
    assert_eq!(
        h.metrics.jobs_lost_total.with_label_values(&["kani"]).get(),
        1
    );
}

#[tokio::test]
async fn a_reclaimed_job_whose_in_progress_was_lost_is_marked_once_github_names_its_runner() {
    let h = Harness::new().await;
    h.profile("kani", "spot_breaker_interruptions = 10").await;
    let r = h.reconciler(100);
    h.github.add_run(REPO, 800, &[(1, "proof")]);
    deliver(
        &h,
        vec![event(1, 800, 1, "proof", JobStatus::Queued, None, None)],
    )
    .await;
    step(&h, &r).await;
    let instance = h.cloud.live_instances().remove(0);
    h.github.set_online(&instance.runner_name, true);
    step(&h, &r).await;
    // The runner took job 1, but its in_progress never reached the ledger:
    // when EC2 reclaims the instance, the sweep sees no job to interrupt.
    assert!(h.cloud.interrupt(&instance.id));
    for _ in 0..3 {
        step(&h, &r).await;
    }
    assert_eq!(
        h.store
            .job_survival(1)
            .await
            .unwrap()
            .unwrap()
            .interrupted_at,
        None
    );
    // GitHub fails the job, naming the runner.
    h.github.set_job(REPO, 1, done("failure"));
    deliver(
        &h,
        vec![event(
            1,
            800,
            1,
            "proof",
            JobStatus::Completed,
            Some(&instance.runner_name),
            Some("failure"),
        )],
    )
    .await;
    step(&h, &r).await;
    let w = worker(&h);
    let report = w.pass().await.unwrap().unwrap();
    assert_eq!(report.attributed_late, 1);
    assert_eq!(report.requested, 1, "{report:?}");
    let s = h.store.job_survival(1).await.unwrap().unwrap();
    assert_eq!(
        s.interrupted_runner.as_deref(),
        Some(instance.runner_name.as_str())
    );
    assert_eq!(job_state(&h, 1).await.0.as_deref(), Some("requested"));
    // Marked once, however often the worker passes.
    assert_eq!(w.pass().await.unwrap().unwrap().attributed_late, 0);
}

#[tokio::test]
async fn an_interrupted_job_github_reports_finished_well_is_not_needed_and_not_lost() {
    let h = Harness::new().await;
    h.profile("kani", "market = 'spot'").await;
    // The ledger saw the job start on our runner, then the reclaim; its
    // `completed` never arrived. GitHub had handed it to another runner,
    // where it succeeded.
    deliver(
        &h,
        vec![event(
            1,
            830,
            1,
            "x",
            JobStatus::InProgress,
            Some("spot-runners-kani-x"),
            None,
        )],
    )
    .await;
    h.store
        .record_interruption(&Interruption {
            job_id: 1,
            runner_name: "spot-runners-kani-x".into(),
            instance_type: Some("c6i.4xlarge".into()),
            subnet_id: Some("subnet-a".into()),
            availability_zone: Some("us-east-1a".into()),
            market: Some(Market::Spot),
            ran_secs: 120,
            at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    h.github.add_run(REPO, 830, &[(1, "x")]);
    h.github.set_job(
        REPO,
        1,
        JobReport {
            status: "completed".into(),
            conclusion: Some("success".into()),
            runner_name: Some("someone-elses-runner".into()),
        },
    );
    run_completed_webhook(&h, 830).await;

    let w = worker(&h);
    let report = w.pass().await.unwrap().unwrap();
    assert_eq!((report.not_needed, report.lost), (1, 0), "{report:?}");
    assert!(rerun_calls(&h).is_empty(), "nothing to re-run");
    let (state, reason) = job_state(&h, 1).await;
    assert_eq!(state.as_deref(), Some("not_needed"));
    assert!(reason.unwrap().contains("finished well"));
    let outcome = |o: &str| h.metrics.reruns_total.with_label_values(&["kani", o]).get();
    assert_eq!((outcome("not_needed"), outcome("lost")), (1, 0));
    assert_eq!(
        h.metrics.jobs_lost_total.with_label_values(&["kani"]).get(),
        0,
        "not a loss: the JobLost alert stays quiet"
    );
    let profiles = h.profiles.get().profiles.clone();
    let explained = spot_runners::reruns::explain_job_survival(
        h.store.as_ref(),
        "spot-runners",
        1,
        Some("kani"),
        &profiles,
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    assert!(
        explained.contains("re-run: not_needed — not needed: GitHub reports the job finished well"),
        "{explained}"
    );
    assert!(
        explained.contains("c6i.4xlarge in us-east-1a, subnet-a"),
        "{explained}"
    );
    // Terminal: later passes neither ask GitHub again nor change it.
    let asked = h.github.calls().len();
    h.clock.advance(Duration::from_secs(3600));
    let report = w.pass().await.unwrap().unwrap();
    assert_eq!((report.not_needed, report.checked), (0, 0));
    assert_eq!(h.github.calls().len(), asked);
    assert_eq!(job_state(&h, 1).await.0.as_deref(), Some("not_needed"));
}
