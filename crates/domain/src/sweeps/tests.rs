use proptest::prelude::*;

use super::*;
use crate::ports::InstanceState;
use crate::Market;

fn t0() -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(1_767_571_200, 0).unwrap_or_default()
}

fn at(secs: i64) -> DateTime<Utc> {
    t0() + Duration::seconds(secs)
}

fn org() -> RunnerScope {
    RunnerScope::Org("acme".into())
}

fn runner(
    name: &str,
    state: RunnerState,
    instance: Option<&str>,
    launched: Option<i64>,
) -> RunnerRecord {
    RunnerRecord {
        name: name.into(),
        profile: "kani".into(),
        state,
        scope: org(),
        github_runner_id: Some(1),
        instance_id: instance.map(str::to_owned),
        instance_type: None,
        subnet_id: None,
        market: None,
        job_id: None,
        launch_attempts: 0,
        last_error_code: None,
        reason: None,
        demand_since: None,
        created_at: t0(),
        launched_at: launched.map(at),
        online_at: None,
        updated_at: t0(),
    }
}

fn instance(id: &str, runner: &str, state: InstanceState, reason: Option<&str>) -> Instance {
    Instance {
        id: id.into(),
        runner_name: Some(runner.into()),
        profile: Some("kani".into()),
        instance_type: "c6i.4xlarge".into(),
        subnet_id: None,
        availability_zone: None,
        market: Market::Spot,
        state,
        state_reason: reason.map(str::to_owned),
        launched_at: None,
        arn: None,
    }
}

fn listed(names: &[&str]) -> BTreeMap<RunnerScope, Vec<GitHubRunner>> {
    let list = names
        .iter()
        .enumerate()
        .map(|(i, n)| GitHubRunner {
            id: i as i64 + 1,
            name: (*n).into(),
            online: false,
            busy: false,
            labels: Vec::new(),
        })
        .collect();
    BTreeMap::from([(org(), list)])
}

#[test]
fn instances_gone_table() {
    use InstanceState::*;
    // (runner state, listed instance, launched secs ago, expected end state)
    type Case<'a> = (
        RunnerState,
        Option<(InstanceState, Option<&'a str>)>,
        i64,
        Option<RunnerState>,
    );
    let cases: &[Case<'_>] = &[
        (RunnerState::Idle, Some((Running, None)), 900, None),
        (
            RunnerState::Idle,
            Some((Terminated, Some(SPOT_RECLAIMED))),
            900,
            Some(RunnerState::Interrupted),
        ),
        (
            RunnerState::Busy,
            Some((ShuttingDown, Some("Client.UserInitiatedShutdown"))),
            900,
            Some(RunnerState::Terminated),
        ),
        // Missing from a listing right after launch: EC2 lags.
        (RunnerState::Booting, None, 30, None),
        (
            RunnerState::Booting,
            None,
            GONE_AFTER_SECS + 1,
            Some(RunnerState::Terminated),
        ),
        (
            RunnerState::Terminating,
            Some((Terminated, None)),
            900,
            Some(RunnerState::Terminated),
        ),
        // Ended rows are not the sweep's business.
        (
            RunnerState::IdleTimeout,
            Some((Terminated, None)),
            900,
            None,
        ),
    ];
    for (state, listed_as, ago, want) in cases {
        let now = at(1000);
        let r = runner("r1", *state, Some("i-1"), Some(1000 - ago));
        let instances: Vec<Instance> = listed_as
            .iter()
            .map(|(s, why)| instance("i-1", "r1", *s, *why))
            .collect();
        let got = instances_gone(&[r], &instances, now);
        assert_eq!(
            got.first().map(|g| g.state),
            *want,
            "{state} listed {listed_as:?} {ago}s"
        );
        if let Some(g) = got.first() {
            assert_eq!(g.was, *state);
            assert_eq!(g.expected, *state == RunnerState::Terminating);
        }
    }
}

#[test]
fn a_done_row_without_an_instance_is_ended_and_others_are_not() {
    let rows = [
        runner("a", RunnerState::Done, None, None),
        runner("b", RunnerState::Done, Some("i-b"), Some(0)),
        runner("c", RunnerState::Busy, None, None),
        runner("d", RunnerState::Requested, None, None),
    ];
    let ended: Vec<&str> = ended_before_launch_recorded(&rows)
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(ended, ["a"]);
}

#[test]
fn orphan_instances_table() {
    let now = at(1000);
    let instances = [
        instance(
            "i-unknown",
            "gone-from-ledger",
            InstanceState::Running,
            None,
        ),
        instance("i-ended", "ended", InstanceState::Running, None),
        instance("i-live", "live", InstanceState::Running, None),
        instance("i-stuck", "stuck", InstanceState::Running, None),
        instance("i-fresh", "fresh", InstanceState::Running, None),
        instance("i-dead", "ended2", InstanceState::Terminated, None),
        // A resumed launch: the ledger names the first instance; a second
        // one under the same name is nobody's.
        instance("i-first", "resumed", InstanceState::Running, None),
        instance("i-second", "resumed", InstanceState::Pending, None),
    ];
    let states = BTreeMap::from([
        ("ended".to_owned(), RunnerState::IdleTimeout),
        ("ended2".to_owned(), RunnerState::IdleTimeout),
        ("live".to_owned(), RunnerState::Idle),
        ("stuck".to_owned(), RunnerState::Terminating),
        ("fresh".to_owned(), RunnerState::Terminating),
        ("resumed".to_owned(), RunnerState::Booting),
    ]);
    let resumed = runner("resumed", RunnerState::Booting, Some("i-first"), Some(0));
    let mut stuck = runner("stuck", RunnerState::Terminating, Some("i-stuck"), Some(0));
    stuck.updated_at = at(1000 - TERMINATE_RETRY_AFTER_SECS - 1);
    let mut fresh = runner("fresh", RunnerState::Terminating, Some("i-fresh"), Some(0));
    fresh.updated_at = at(990);
    let got = orphan_instances(&instances, &states, &[stuck, fresh, resumed], now);
    assert_eq!(got.orphans, ["i-unknown", "i-ended", "i-second"]);
    assert_eq!(got.retries, ["i-stuck"]);
}

#[test]
fn orphan_registrations_table() {
    let mut l = listed(&["ours-unknown", "stranger", "live", "done", "ended"]);
    if let Some(list) = l.get_mut(&org()) {
        list.push(GitHubRunner {
            id: 99,
            name: "ours-online".into(),
            online: true,
            busy: false,
            labels: Vec::new(),
        });
    }
    let states = BTreeMap::from([
        ("live".to_owned(), RunnerState::Booting),
        ("done".to_owned(), RunnerState::Done),
        ("ended".to_owned(), RunnerState::Terminated),
    ]);
    let got: Vec<String> = orphan_registrations(&l, &states, |n| n.starts_with("ours-"))
        .into_iter()
        .map(|o| o.name)
        .collect();
    assert_eq!(got, ["ours-unknown", "done", "ended"]);
}

#[test]
fn one_listing_is_not_proof_two_a_sweep_apart_are() {
    let apart = Duration::seconds(10);
    let rows = [runner("r1", RunnerState::Idle, Some("i-1"), Some(0))];
    let empty = listed(&[]);
    let first = registrations_gone(&rows, &empty, &BTreeMap::new(), apart, at(100));
    assert!(first.gone.is_empty(), "one listing");
    assert_eq!(first.missing.get("r1"), Some(&at(100)));
    let too_soon = registrations_gone(&rows, &empty, &first.missing, apart, at(105));
    assert!(too_soon.gone.is_empty(), "two listings too close together");
    let second = registrations_gone(&rows, &empty, &too_soon.missing, apart, at(110));
    assert_eq!(second.gone.len(), 1);
    assert_eq!(second.gone[0].was, RunnerState::Idle);
    // Listed again in between: the count starts over.
    let back = registrations_gone(&rows, &listed(&["R1"]), &first.missing, apart, at(110));
    assert!(back.gone.is_empty() && back.missing.is_empty());
    // A failed listing (scope absent) says nothing but forgets nothing.
    let failed = registrations_gone(&rows, &BTreeMap::new(), &first.missing, apart, at(200));
    assert!(failed.gone.is_empty());
    assert_eq!(failed.missing, first.missing);
}

#[test]
fn a_fresh_runner_or_one_not_yet_launched_is_never_missing() {
    let rows = [
        runner(
            "fresh",
            RunnerState::Booting,
            Some("i-1"),
            Some(100 - REGISTRATION_SETTLE_SECS + 1),
        ),
        runner("requested", RunnerState::Requested, None, None),
    ];
    let missing = BTreeMap::from([("fresh".to_owned(), at(0)), ("requested".to_owned(), at(0))]);
    let got = registrations_gone(
        &rows,
        &listed(&[]),
        &missing,
        Duration::seconds(10),
        at(100),
    );
    assert!(got.gone.is_empty());
}

#[test]
fn a_busy_runner_gone_from_github_names_its_job() {
    let mut busy = runner("b", RunnerState::Busy, Some("i-1"), Some(0));
    busy.job_id = Some(42);
    let missing = BTreeMap::from([("b".to_owned(), at(0))]);
    let got = registrations_gone(
        &[busy],
        &listed(&[]),
        &missing,
        Duration::seconds(10),
        at(100),
    );
    assert_eq!(got.gone[0].job_id, Some(42));
}

#[test]
fn job_checks_and_lost_jobs() {
    let report = |status: &str| JobReport {
        status: status.into(),
        conclusion: Some("success".into()),
        runner_name: Some("r".into()),
    };
    assert_eq!(job_check(&report("queued")), JobCheck::Queued);
    assert!(matches!(
        job_check(&report("in_progress")),
        JobCheck::Started { .. }
    ));
    assert!(matches!(
        job_check(&report("completed")),
        JobCheck::Finished { .. }
    ));
    assert!(matches!(
        job_check(&report("something_new")),
        JobCheck::Finished { .. }
    ));
    let job = |id: i64, created: Option<i64>| GitHubJob {
        id,
        run_id: id,
        run_attempt: 1,
        name: "j".into(),
        workflow_name: None,
        labels: Vec::new(),
        html_url: None,
        created_at: created.map(at),
    };
    let listed = vec![
        job(1, Some(0)),
        job(2, Some(0)),
        job(3, Some(90)),
        job(4, None),
    ];
    let known = BTreeSet::from([2]);
    let lost: Vec<i64> = lost_queued_jobs(listed, &known, at(100))
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(lost, [1, 4], "known and in-flight ones are not lost");
}

proptest! {
    /// Whatever the listings do, a runner is never declared gone on its
    /// first missing listing, and never while it is listed.
    #[test]
    fn never_gone_on_one_listing_nor_while_listed(
        seen in proptest::collection::vec(any::<bool>(), 1..12),
        gaps in proptest::collection::vec(1i64..30, 12),
    ) {
        let apart = Duration::seconds(10);
        let rows = [runner("r1", RunnerState::Idle, Some("i-1"), Some(-1000))];
        let mut missing = BTreeMap::new();
        let mut now = at(0);
        let mut missing_since: Option<DateTime<Utc>> = None;
        for (i, listed_now) in seen.iter().enumerate() {
            now += Duration::seconds(gaps[i]);
            let l = if *listed_now { listed(&["r1"]) } else { listed(&[]) };
            let got = registrations_gone(&rows, &l, &missing, apart, now);
            if *listed_now {
                prop_assert!(got.gone.is_empty());
                missing_since = None;
            } else {
                let since = *missing_since.get_or_insert(now);
                prop_assert_eq!(!got.gone.is_empty(), now - since >= apart);
                if !got.gone.is_empty() {
                    missing_since = None;
                }
            }
            missing = got.missing;
        }
    }
}
