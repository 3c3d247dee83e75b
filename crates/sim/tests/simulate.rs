//! `spot-runners simulate`: the example scenarios run, the same seed gives
//! the same report byte for byte, the bad day strands no job, and no
//! example day loses a job to a spot reclaim (the production re-run worker
//! re-runs every interrupted job, each at most twice).

use std::path::PathBuf;

use spot_runners_sim::duration::Dur;
use spot_runners_sim::report::Report;
use spot_runners_sim::scenario::Scenario;
use spot_runners_sim::simulate::{run, run_scripted};

fn example(name: &str) -> Scenario {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    Scenario::load(&path).unwrap()
}

fn report_json(scenario: &Scenario) -> String {
    run(scenario, &mut |_| {}).unwrap().to_json()
}

/// Every job a spot reclaim interrupted was re-run, none more than twice,
/// and the service gave up on none.
fn assert_no_job_lost(report: &Report) {
    let json = report.to_json();
    let t = &report.total;
    assert!(t.jobs_interrupted > 0, "the day has reclaims: {json}");
    assert_eq!(t.jobs_lost, 0, "{json}");
    assert_eq!(t.jobs_rerun, t.jobs_interrupted, "{json}");
    assert!(t.max_reruns_per_job <= 2, "{json}");
    assert_eq!(report.service.jobs_lost, 0, "{json}");
    assert_eq!(t.unfinished, 0, "{json}");
    assert!(t.cost_all_spot_dollars <= t.cost_dollars, "{json}");
    assert!(t.cost_dollars <= t.cost_all_on_demand_dollars, "{json}");
}

#[test]
fn the_first_users_day_loses_no_job_to_a_reclaim() {
    let report = run(&example("first-users-day.json"), &mut |_| {}).unwrap();
    assert_no_job_lost(&report);
    assert!(report.total.reruns_started > 0);
}

#[test]
fn with_reruns_off_every_interrupted_job_is_lost() {
    let mut s = Scenario::built_in();
    s.cloud.interruptions_per_hour.insert("default".into(), 1.0);
    for p in &mut s.profiles {
        p.max_interruption_reruns = 0;
    }
    let report = run(&s, &mut |_| {}).unwrap();
    let json = report.to_json();
    let t = &report.total;
    assert!(t.jobs_interrupted > 0, "{json}");
    assert_eq!(t.jobs_rerun, 0, "{json}");
    assert_eq!(t.jobs_lost, t.jobs_interrupted, "{json}");
    assert_eq!(report.service.jobs_lost, t.jobs_interrupted, "{json}");
    assert_eq!(report.world.rerun_jobs, 0, "{json}");
}

const MATRIX: &str = r#"{
  "name": "a four-job matrix, three of them reclaimed",
  "duration": "10m",
  "profiles": [ { "name": "kani", "labels": ["linux", "x64", "kani"], "instance_types": ["c6i.4xlarge"] } ],
  "jobs": [ { "name": "proofs", "labels": ["self-hosted", "linux", "x64", "kani"], "repository": "acme/proofs",
      "duration": ["1h", "1h"], "matrix": 4, "arrivals": [ { "burst": { "at": "1m", "count": 1 } } ] } ]
}"#;

#[tokio::test(start_paused = true)]
async fn a_matrix_run_gets_its_three_reclaimed_jobs_rerun_and_not_its_own_failure() {
    let s = Scenario::parse("matrix", MATRIX).unwrap();
    let mut struck = false;
    let report = run_scripted(&s, &mut |_| {}, &mut |world| {
        let running: Vec<i64> = world
            .jobs()
            .filter(|j| j.started_at.is_some() && j.completed_at.is_none())
            .map(|j| j.id)
            .collect();
        if struck || running.len() < 4 || world.clock().elapsed().as_secs() < 30 * 60 {
            return;
        }
        struck = true;
        world.fail_on_its_own(running[3]);
        for id in &running[..3] {
            assert!(world.reclaim_instance_of(*id));
        }
    })
    .await
    .unwrap();
    let json = report.to_json();
    assert!(struck, "{json}");
    assert_eq!(report.world.workflow_runs, 1, "{json}");
    let t = &report.total;
    assert_eq!(t.jobs_interrupted, 3, "{json}");
    assert_eq!(t.jobs_rerun, 3, "all three, not only the first: {json}");
    assert_eq!(t.jobs_lost, 0, "{json}");
    assert_eq!(
        report.world.rerun_jobs, 3,
        "the job that failed on its own is not re-run: {json}"
    );
    assert_eq!((t.jobs, t.succeeded, t.failed), (7, 3, 4), "{json}");
    assert_eq!(t.max_reruns_per_job, 1, "{json}");
    assert_eq!(t.reruns_started, 3, "{json}");
    assert_eq!(t.reruns_on_demand, 3, "{json}");
    assert_eq!(report.service.reruns.get("requested"), Some(&3), "{json}");
}

#[test]
fn the_same_seed_gives_the_same_report_and_another_seed_another() {
    let mut s = Scenario::built_in();
    s.webhooks.lost = 0.05;
    s.webhooks.duplicated = 0.05;
    s.webhooks.reordered = 0.05;
    s.cloud.interruptions_per_hour.insert("default".into(), 0.5);
    let first = report_json(&s);
    assert_eq!(first, report_json(&s));
    let report = run(&s, &mut |_| {}).unwrap();
    assert_eq!(report.to_table(), run(&s, &mut |_| {}).unwrap().to_table());
    assert!(report.total.jobs > 10, "{first}");
    assert!(report.total.succeeded > 0, "{first}");
    s.seed = 2;
    assert_ne!(first, report_json(&s));
}

#[test]
fn every_example_scenario_is_valid() {
    for name in ["first-users-day.json", "matrix-burst.json", "bad-day.json"] {
        let s = example(name);
        s.validate().unwrap();
    }
}

#[test]
fn the_bad_day_strands_no_job() {
    let s = example("bad-day.json");
    let report = run(&s, &mut |_| {}).unwrap();
    let json = report.to_json();
    assert_eq!(report.total.stranded, 0, "{json}");
    assert_eq!(report.total.unfinished, 0, "{json}");
    assert!(report.webhooks.lost > 0 && report.webhooks.duplicated > 0);
    assert!(report.service.duplicates_ignored > 0);
    assert!(report.world.spot_interruptions > 0);
    assert!(
        report.service.stale_healed > 0,
        "lost webhooks healed: {json}"
    );
    assert_no_job_lost(&report);
}

#[test]
fn a_matrix_burst_is_served_within_the_caps_and_ec2s_rate_limit() {
    let mut s = example("matrix-burst.json");
    s.drain = Dur::secs(12 * 3600);
    let report = run(&s, &mut |_| {}).unwrap();
    let json = report.to_json();
    let reruns = report.world.rerun_jobs;
    assert_eq!(report.total.jobs, 500 + reruns, "{json}");
    assert_eq!(
        report.total.succeeded + report.total.failed,
        500 + reruns,
        "{json}"
    );
    assert_eq!(
        report.throttled_calls, 0,
        "paced under EC2's bucket: {json}"
    );
    assert_eq!(report.total.stranded, 0, "{json}");
}

#[test]
fn a_reconciler_crashing_inside_passes_strands_nothing_and_replays() {
    let mut s = example("first-users-day.json");
    s.crashes_per_hour = 4.0;
    let report = run(&s, &mut |_| {}).unwrap();
    let json = report.to_json();
    assert!(report.reconciler_crashes > 20, "{json}");
    assert_eq!(report.total.stranded, 0, "{json}");
    assert_eq!(report.total.unfinished, 0, "{json}");
    assert_eq!(report.total.jobs_lost, 0, "{json}");
    assert_eq!(json, run(&s, &mut |_| {}).unwrap().to_json());
}
