//! `spot-runners simulate`: the example scenarios run, the same seed gives
//! the same report byte for byte, and the bad day strands no job.

use std::path::PathBuf;

use spot_runners_sim::duration::Dur;
use spot_runners_sim::scenario::Scenario;
use spot_runners_sim::simulate::run;

fn example(name: &str) -> Scenario {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    Scenario::load(&path).unwrap()
}

fn report_json(scenario: &Scenario) -> String {
    run(scenario, &mut |_| {}).unwrap().to_json()
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
}

#[test]
fn a_matrix_burst_is_served_within_the_caps_and_ec2s_rate_limit() {
    let mut s = example("matrix-burst.json");
    s.drain = Dur::secs(12 * 3600);
    let report = run(&s, &mut |_| {}).unwrap();
    let json = report.to_json();
    assert_eq!(report.total.jobs, 500, "{json}");
    assert_eq!(report.total.succeeded + report.total.failed, 500, "{json}");
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
    assert_eq!(json, run(&s, &mut |_| {}).unwrap().to_json());
}
