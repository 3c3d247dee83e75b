//! Reaping and self-healing on the fake cloud and fake GitHub, against a
//! real PostgreSQL, with an injected clock: timeouts happen because the
//! test moves the clock, never because it waited.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fleet::{launch_request, terminations, Harness};
use spot_runners_domain::clock::Clock;
use spot_runners_domain::ports::{Cloud, GitHub, GitHubJob, JitRequest, JobReport, RunnerScope};
use spot_runners_reconciler::Reconciler;
use spot_runners_store::PgStore;

const MINUTE: Duration = Duration::from_secs(60);

fn job(status: &str, conclusion: Option<&str>) -> JobReport {
    JobReport {
        status: status.to_owned(),
        conclusion: conclusion.map(str::to_owned),
        runner_name: None,
    }
}

/// Our runners: (name, state, instance id).
async fn runners(h: &Harness) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as("SELECT name, state, instance_id FROM runners ORDER BY created_at, name")
        .fetch_all(h.store.pool())
        .await
        .unwrap()
}

/// One job queued (on GitHub too, so stale checks find it still queued),
/// one runner provisioned for it. Returns (runner, instance).
async fn one_booting_runner(h: &Harness, r: &Arc<Reconciler>) -> (String, String) {
    h.profile("kani", "max_instances = 5").await;
    h.queue("kani", 0..1).await;
    h.github.set_job("acme/proofs", 0, job("queued", None));
    h.reconcile(r).await;
    let all = runners(h).await;
    assert_eq!(all.len(), 1);
    let (name, state, instance) = all.into_iter().next().unwrap();
    assert_eq!(state, "booting");
    (name, instance.unwrap())
}

async fn sweep(r: &Reconciler) -> spot_runners_reconciler::SweepReport {
    r.sweep().await.unwrap().expect("the only replica leads")
}

#[tokio::test]
async fn a_runner_that_never_comes_online_is_reaped_and_replaced() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    let (name, instance) = one_booting_runner(&h, &r).await;

    h.clock.advance(9 * MINUTE);
    assert_eq!(sweep(&r).await.reaped, 0, "within boot_timeout_secs (600)");
    h.clock.advance(MINUTE + Duration::from_secs(1));
    assert_eq!(sweep(&r).await.reaped, 1);

    assert_eq!(terminations(&h.cloud), [vec![instance.clone()]]);
    assert!(
        h.github.runners().iter().all(|g| g.name != name),
        "the registration is deleted too"
    );
    // The job is still queued: the planner covers it again.
    h.reconcile(&r).await;
    let all = runners(&h).await;
    assert_eq!(all[0].1, "boot_timeout");
    assert_eq!(all[1].1, "booting");
    assert_eq!(h.cloud.live_count(None), 1);
    assert!(h
        .metrics
        .render()
        .contains(r#"spot_runners_reaps_total{profile="kani",reason="boot_timeout"} 1"#));
}

#[tokio::test]
async fn an_idle_runner_goes_only_when_surplus_and_past_its_idle_timeout() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    let (name, instance) = one_booting_runner(&h, &r).await;
    assert!(h.github.set_online(&name, true));
    assert_eq!(sweep(&r).await.online, 1);
    assert_eq!(runners(&h).await[0].1, "idle");

    // Still wanted by the queued job: kept however long it idles.
    h.clock.advance(30 * MINUTE);
    assert_eq!(sweep(&r).await.reaped, 0);

    // The job is cancelled while queued: the runner is surplus now, and
    // has idled far past idle_timeout_secs (300).
    h.sql("UPDATE workflow_jobs SET status = 'completed', conclusion = 'cancelled', completed_at = now()")
        .await;
    assert_eq!(sweep(&r).await.reaped, 1);
    assert_eq!(runners(&h).await[0].1, "idle_timeout");
    assert_eq!(terminations(&h.cloud), [vec![instance]]);
}

#[tokio::test]
async fn a_fresh_surplus_runner_gets_its_idle_timeout_first() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    let (name, _) = one_booting_runner(&h, &r).await;
    h.sql("UPDATE workflow_jobs SET status = 'completed', completed_at = now()")
        .await;
    h.github.set_online(&name, true);
    sweep(&r).await;
    h.clock.advance(4 * MINUTE);
    assert_eq!(sweep(&r).await.reaped, 0, "new demand may still take it");
    h.clock.advance(MINUTE);
    assert_eq!(sweep(&r).await.reaped, 1);
}

#[tokio::test]
async fn a_warm_pool_keeps_idle_runners_until_their_lifetime() {
    let h = Harness::new().await;
    h.profile(
        "kani",
        "max_instances = 5, min_idle = 1, max_lifetime_secs = 7200",
    )
    .await;
    // The warm pool registers where the profile's latest job came from.
    h.queue("kani", 0..1).await;
    h.sql("UPDATE workflow_jobs SET status = 'completed', completed_at = now()")
        .await;
    let r = h.reconciler(100);
    h.reconcile(&r).await;
    let (name, _, _) = runners(&h).await.remove(0);
    h.github.set_online(&name, true);
    sweep(&r).await;

    h.clock.advance(119 * MINUTE);
    assert_eq!(sweep(&r).await.reaped, 0, "min_idle keeps it");
    h.clock.advance(MINUTE);
    assert_eq!(sweep(&r).await.reaped, 1, "max_lifetime_secs ends it");
    // And the pool is refilled.
    h.reconcile(&r).await;
    let states: Vec<String> = runners(&h).await.into_iter().map(|r| r.1).collect();
    assert_eq!(states, ["terminated", "booting"]);
    assert!(h
        .metrics
        .render()
        .contains(r#"spot_runners_reaps_total{profile="kani",reason="max_lifetime"} 1"#));
}

#[tokio::test]
async fn a_busy_runner_goes_only_on_completion_or_at_its_lifetime() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    let (name, instance) = one_booting_runner(&h, &r).await;
    h.github.set_online(&name, true);
    sweep(&r).await;
    h.sql(&format!(
        "UPDATE workflow_jobs SET status = 'in_progress', runner_name = '{name}', in_progress_at = now()"
    ))
    .await;
    r.pass().await.unwrap();
    assert_eq!(runners(&h).await[0].1, "busy");

    // GitHub's busy flag lags: it says idle, and no demand is queued.
    // Seven hours of a long proof later, the runner is still there.
    h.clock.advance(7 * 60 * MINUTE);
    assert_eq!(sweep(&r).await.reaped, 0);
    assert!(terminations(&h.cloud).is_empty());

    // The default max_lifetime_secs is 8 h.
    h.clock.advance(60 * MINUTE);
    assert_eq!(sweep(&r).await.reaped, 1);
    assert_eq!(terminations(&h.cloud), [vec![instance]]);
}

/// GitHub lists the runner busy with a job whose `in_progress` the ledger
/// never got: it is not counted as available for the queued job (which gets
/// a runner of its own), nor reaped as idle; once it leaves GitHub after
/// that job, its instance goes.
#[tokio::test]
async fn a_runner_github_lists_busy_is_taken_not_idle() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    let (name, instance) = one_booting_runner(&h, &r).await;
    h.github.set_online(&name, true);
    h.github.set_busy(&name, true);
    sweep(&r).await;
    assert_eq!(runners(&h).await[0].1, "busy");
    h.reconcile(&r).await;
    let states: Vec<String> = runners(&h).await.into_iter().map(|r| r.1).collect();
    assert_eq!(
        states,
        ["busy", "booting"],
        "the queued job gets its own runner"
    );
    let second = runners(&h).await.remove(1).0;
    h.github.set_online(&second, true);

    h.clock.advance(30 * MINUTE);
    assert_eq!(sweep(&r).await.reaped, 0);
    assert!(terminations(&h.cloud).is_empty());

    h.github.deregister(&name);
    // One listing is not proof (offset paging can skip a runner): missing
    // from two a sweep apart, it is gone.
    sweep(&r).await;
    assert_eq!(runners(&h).await[0].1, "busy");
    h.clock.advance(Duration::from_secs(10));
    sweep(&r).await;
    assert_eq!(runners(&h).await[0].1, "terminated");
    assert_eq!(terminations(&h.cloud), [vec![instance]]);
}

#[tokio::test]
async fn orphaned_instances_of_this_controller_are_terminated_and_nothing_else() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    let (_, ours) = one_booting_runner(&h, &r).await;
    let unknown = h
        .cloud
        .launch(&launch_request(
            "spot-runners",
            "spot-runners-kani-lost0001",
        ))
        .await
        .unwrap();
    let staging = h
        .cloud
        .launch(&launch_request(
            "spot-runners-staging",
            "spot-runners-staging-kani-abcdef12",
        ))
        .await
        .unwrap();

    let report = sweep(&r).await;
    assert_eq!(report.orphan_instances, 1);
    assert_eq!(terminations(&h.cloud), [vec![unknown.id]]);
    let live: Vec<String> = h
        .cloud
        .instances()
        .into_iter()
        .filter(|i| i.instance.state.is_alive())
        .map(|i| i.instance.id)
        .collect();
    assert!(live.contains(&ours), "the ledger's own runner stays");
    assert!(
        live.contains(&staging.id),
        "another deployment's instance is not ours"
    );
    assert!(h
        .metrics
        .render()
        .contains(r#"spot_runners_orphans_total{kind="instance"} 1"#));
}

#[tokio::test]
async fn an_instance_of_a_runner_that_ended_is_terminated() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    let (name, instance) = one_booting_runner(&h, &r).await;
    // A crash between ending the runner and terminating its instance.
    h.sql(&format!(
        "UPDATE runners SET state = 'idle_timeout' WHERE name = '{name}'"
    ))
    .await;
    assert_eq!(sweep(&r).await.orphan_instances, 1);
    assert_eq!(terminations(&h.cloud), [vec![instance]]);
}

#[tokio::test]
async fn leftover_github_registrations_are_deleted_only_when_ours_and_offline() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    let (ours, _) = one_booting_runner(&h, &r).await;
    let org = RunnerScope::Org("acme".to_owned());
    let register = |name: &str| JitRequest {
        name: name.to_owned(),
        runner_group_id: 1,
        labels: vec!["self-hosted".to_owned()],
    };
    for name in [
        "spot-runners-kani-crash001", // ours by name, unknown to the ledger
        "spot-runners-kani-online01", // ours, unknown, but online: left alone
        "someone-elses-runner",       // not ours
        "spot-runners-staging-kani-abcdef12", // another deployment's
    ] {
        h.github
            .generate_jit_config(&org, &register(name))
            .await
            .unwrap();
    }
    h.github.set_online("spot-runners-kani-online01", true);

    let report = sweep(&r).await;
    assert_eq!(report.orphan_registrations, 1);
    let mut left: Vec<String> = h.github.runners().into_iter().map(|g| g.name).collect();
    left.sort();
    let mut want = vec![
        ours,
        "someone-elses-runner".to_owned(),
        "spot-runners-kani-online01".to_owned(),
        "spot-runners-staging-kani-abcdef12".to_owned(),
    ];
    want.sort();
    assert_eq!(left, want, "our booting runner's registration stays too");
}

#[tokio::test]
async fn a_finished_runner_left_registered_is_deleted_once_offline() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    let (name, _) = one_booting_runner(&h, &r).await;
    h.github.set_online(&name, true);
    sweep(&r).await;
    h.sql(&format!(
        "UPDATE workflow_jobs SET status = 'completed', runner_name = '{name}', completed_at = now()"
    ))
    .await;
    r.pass().await.unwrap();
    assert_eq!(
        sweep(&r).await.orphan_registrations,
        0,
        "still online: exiting"
    );
    h.github.set_online(&name, false);
    assert_eq!(sweep(&r).await.orphan_registrations, 1);
    assert!(h.github.runners().is_empty());
}

/// A lost `completed` leaves a job queued in the ledger; the stale check
/// asks GitHub and closes it, so its runner becomes surplus.
#[tokio::test]
async fn a_stale_job_is_repaired_from_the_jobs_api() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    let (name, _) = one_booting_runner(&h, &r).await;
    // Its runner is online and idle, yet the job stays queued: a suspect.
    h.github.set_online(&name, true);
    h.github
        .set_job("acme/proofs", 0, job("completed", Some("cancelled")));

    h.clock.advance(2 * MINUTE);
    assert_eq!(sweep(&r).await.stale_checked, 0, "not stale yet");
    h.clock.advance(2 * MINUTE);
    let report = sweep(&r).await;
    assert_eq!((report.stale_checked, report.stale_closed), (1, 1));
    let (status, conclusion): (String, Option<String>) =
        sqlx::query_as("SELECT status, conclusion FROM workflow_jobs WHERE id = 0")
            .fetch_one(h.store.pool())
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), conclusion.as_deref()),
        ("completed", Some("cancelled"))
    );
    assert!(h
        .metrics
        .render()
        .contains(r#"spot_runners_stale_jobs_total{outcome="finished"} 1"#));
}

/// A backlog behind a cap: jobs merely waiting for room are asked about
/// late, a few per sweep, and then only hourly.
#[tokio::test]
async fn stale_checks_of_a_backlog_stay_within_a_budget() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 1").await;
    h.queue("kani", 0..12).await;
    for id in 0..12 {
        h.github.set_job("acme/proofs", id, job("queued", None));
    }
    let r = h.reconciler(100);
    let asked = || {
        h.github
            .calls()
            .iter()
            .filter(|c| c.method() == "job")
            .count()
    };
    h.clock.advance(10 * MINUTE);
    assert_eq!(
        sweep(&r).await.stale_checked,
        0,
        "waiting under a cap is no suspect"
    );
    h.clock.advance(6 * MINUTE);
    assert_eq!(sweep(&r).await.stale_checked, 5);
    assert_eq!(sweep(&r).await.stale_checked, 5);
    assert_eq!(sweep(&r).await.stale_checked, 2);
    assert_eq!(sweep(&r).await.stale_checked, 0, "all checked recently");
    assert_eq!(asked(), 12);
    h.clock.advance(30 * MINUTE);
    assert_eq!(sweep(&r).await.stale_checked, 0);
    h.clock.advance(31 * MINUTE);
    assert_eq!(sweep(&r).await.stale_checked, 5, "rechecked hourly");
}

/// Two replicas on one database: one leads the sweeps; completions are
/// claimed by exactly one of them.
#[tokio::test]
async fn two_replicas_never_terminate_the_same_instance_twice() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 20").await;
    h.queue("kani", 0..12).await;
    let a = h.reconciler(100);
    h.reconcile(&a).await;
    // A second replica: its own pool, so its own database sessions.
    let other = Arc::new(PgStore::connect(&h._db.url).await.unwrap());
    let b = h.reconciler_on(other, 100);
    assert!(a.sweep().await.unwrap().is_some(), "a leads");
    assert!(b.sweep().await.unwrap().is_none(), "b does not");

    h.sql(
        "UPDATE workflow_jobs j SET status = 'completed', completed_at = now(), runner_name = r.name
         FROM (SELECT name, row_number() OVER (ORDER BY name) - 1 AS n FROM runners) r
         WHERE j.id = r.n",
    )
    .await;
    let (ra, rb) = tokio::join!(a.pass(), b.pass());
    assert_eq!(ra.unwrap().terminated + rb.unwrap().terminated, 12);
    let mut terminated: Vec<String> = terminations(&h.cloud).into_iter().flatten().collect();
    let total = terminated.len();
    terminated.sort();
    terminated.dedup();
    assert_eq!((total, terminated.len()), (12, 12));
    // Sweeps by either replica afterwards terminate nothing more.
    h.clock.advance(2 * MINUTE);
    a.sweep().await.unwrap();
    b.sweep().await.unwrap();
    assert_eq!(terminations(&h.cloud).into_iter().flatten().count(), 12);
}

/// GitHub never resends a lost `queued`: the sweep finds the job in the
/// repository's queued runs and covers it.
#[tokio::test]
async fn a_job_whose_queued_delivery_was_lost_is_found_and_covered() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    one_booting_runner(&h, &r).await;
    // That reconcile's sweep polled already; the next poll is a minute on.
    h.clock.advance(MINUTE);
    let labels: Vec<String> = ["self-hosted", "linux", "x64", "kani"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let lost = |id: i64, age_secs: i64| GitHubJob {
        id,
        run_id: 500,
        run_attempt: 1,
        name: format!("proof {id}"),
        workflow_name: Some("Kani".to_owned()),
        labels: labels.clone(),
        html_url: None,
        created_at: Some(h.clock.now() - chrono::Duration::seconds(age_secs)),
    };
    h.github.queue_job("acme/proofs", lost(77, 300));
    // Created a moment ago: its delivery may still be on the way.
    h.github.queue_job("acme/proofs", lost(78, 5));

    let report = sweep(&r).await;
    assert_eq!(report.discovered, 1);
    let (status, profile): (String, Option<String>) =
        sqlx::query_as("SELECT status, profile FROM workflow_jobs WHERE id = 77")
            .fetch_one(h.store.pool())
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), profile.as_deref()),
        ("queued", Some("kani"))
    );
    assert_eq!(
        sweep(&r).await.discovered,
        0,
        "one repository a minute, not every sweep"
    );

    h.reconcile(&r).await;
    let booting = runners(&h)
        .await
        .iter()
        .filter(|r| r.1 == "booting")
        .count();
    assert_eq!(booting, 2, "the found job got its runner");
    assert!(h
        .metrics
        .render()
        .contains(r#"spot_runners_stale_jobs_total{outcome="discovered"} 1"#));
}

/// A lost `completed`: the busy runner has left GitHub (a JIT runner does
/// after its job), so the job is checked at once and its instance goes.
#[tokio::test]
async fn a_busy_runner_gone_from_github_has_its_job_checked_and_its_instance_terminated() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    let (name, instance) = one_booting_runner(&h, &r).await;
    h.sql(&format!(
        "UPDATE workflow_jobs SET status = 'in_progress', runner_name = '{name}', in_progress_at = now()"
    ))
    .await;
    r.pass().await.unwrap();
    assert_eq!(runners(&h).await[0].1, "busy");
    h.github.deregister(&name);
    h.clock.advance(MINUTE);
    h.github.set_job(
        "acme/proofs",
        0,
        JobReport {
            status: "completed".to_owned(),
            conclusion: Some("success".to_owned()),
            runner_name: Some(name.clone()),
        },
    );
    // Missing from one listing proves nothing; from the next sweep's, it does.
    assert_eq!(sweep(&r).await.stale_checked, 0);
    h.clock.advance(Duration::from_secs(10));
    let report = sweep(&r).await;
    assert_eq!((report.stale_checked, report.stale_closed), (1, 1));
    assert_eq!(r.pass().await.unwrap().terminated, 1);
    assert_eq!(terminations(&h.cloud), [vec![instance]]);
}

/// A wave of completions can empty EC2's `TerminateInstances` bucket: a
/// throttled terminate is retried at once with backoff, not left for the
/// next sweep.
#[tokio::test]
async fn a_throttled_terminate_is_retried() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    let (name, instance) = one_booting_runner(&h, &r).await;
    h.sql(&format!(
        "UPDATE workflow_jobs SET status = 'completed', runner_name = '{name}', completed_at = now()"
    ))
    .await;
    h.cloud.fail_next_terminate("RequestLimitExceeded");
    assert_eq!(r.pass().await.unwrap().terminated, 1);
    assert_eq!(terminations(&h.cloud), [vec![instance]]);
}
