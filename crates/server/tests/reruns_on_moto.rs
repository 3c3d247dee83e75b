//! Spot survival end to end on the real adapters: the real service (real
//! PostgreSQL, octocrab against a wiremock GitHub, aws-sdk-ec2 against moto),
//! driven by signed webhooks of GitHub's payload shape.
//!
//! A queued job gets a JIT runner on a spot instance in moto; `in_progress`
//! names the runner; EC2 reclaims the instance; the job is marked
//! interrupted (instance type, AZ, subnet, market, how long it ran). The run
//! is still going when the service asks GitHub, so nothing is re-run yet.
//! GitHub fails the job, another job of the run fails on its own, and the
//! run completes: the service re-runs exactly the interrupted job
//! (`POST …/jobs/{job_id}/rerun`, not `rerun-failed-jobs`, which would re-run
//! the other one too). The re-run's `queued` (new job id, `run_attempt` 2)
//! gets a runner on an on-demand instance in moto.
//!
//! moto cannot reclaim a spot instance; [`ReclaimingCloud`] terminates it on
//! moto and reports EC2's reclaim reason for it (see its module).

mod common;
#[path = "support/moto.rs"]
mod moto;
#[path = "support/real_adapters.rs"]
mod real_adapters;
#[path = "support/reclaiming_cloud.rs"]
mod reclaiming_cloud;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use base64::Engine;
use common::{fixture_bytes, job_payload, TestApp, SECRET};
use real_adapters::spawn_on_real_adapters;
use reclaiming_cloud::ReclaimingCloud;
use serde_json::{json, Value};
use spot_runners_store::Store;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const REPO: &str = "octo-org/example-workflow";
/// The run of the official `workflow_job` example.
const RUN_ID: i64 = 940463255;
const JOB: i64 = 777;
/// A job of the same run on a GitHub-hosted runner that fails on its own.
const OWN_FAILURE: i64 = 778;
/// The re-run of [`JOB`] in attempt 2.
const RERUN: i64 = 779;
const KANI: &[&str] = &["self-hosted", "Linux", "X64", "spot", "kani"];
const CONTROLLER: &str = "e2e-reruns";

/// A `workflow_job` delivery of the official example's shape for a job of
/// [`RUN_ID`].
fn job(
    action: &str,
    id: i64,
    attempt: i64,
    name: &str,
    labels: &[&str],
    runner: Option<(&str, i64)>,
    conclusion: Option<&str>,
) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&job_payload(action, id, labels)).unwrap();
    let j = &mut v["workflow_job"];
    j["run_id"] = RUN_ID.into();
    j["run_attempt"] = attempt.into();
    j["name"] = name.into();
    j["workflow_name"] = "Kani proofs".into();
    if let Some((runner_name, runner_id)) = runner {
        j["runner_name"] = runner_name.into();
        j["runner_id"] = runner_id.into();
    }
    if let Some(c) = conclusion {
        j["conclusion"] = c.into();
    }
    serde_json::to_vec(&v).unwrap()
}

/// The run as GitHub's runs API answers it (the `workflow_run` object of
/// the official `completed` example, which is the same object).
fn run_object(attempt: i64, status: &str, conclusion: Option<&str>) -> Value {
    let mut v: Value =
        serde_json::from_slice(&fixture_bytes("workflow_run/completed-org-2.json")).unwrap();
    let mut run = v["workflow_run"].take();
    run["id"] = RUN_ID.into();
    run["run_attempt"] = attempt.into();
    run["status"] = status.into();
    run["conclusion"] = conclusion.map_or(Value::Null, Value::from);
    run["repository"]["full_name"] = REPO.into();
    run["repository"]["name"] = "example-workflow".into();
    run
}

/// The `workflow_run` `completed` delivery for attempt 1.
fn run_completed() -> Vec<u8> {
    let mut v: Value =
        serde_json::from_slice(&fixture_bytes("workflow_run/completed-org-2.json")).unwrap();
    v["workflow_run"] = run_object(1, "completed", Some("failure"));
    v["repository"]["full_name"] = REPO.into();
    v["repository"]["name"] = "example-workflow".into();
    serde_json::to_vec(&v).unwrap()
}

async fn runs_api_answers(server: &MockServer, run: Value) -> wiremock::MockGuard {
    Mock::given(method("GET"))
        .and(path(format!("/repos/{REPO}/actions/runs/{RUN_ID}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(run))
        .mount_as_scoped(server)
        .await
}

async fn requests_to(server: &MockServer, verb: &str, p: &str) -> usize {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == verb && r.url.path() == p)
        .count()
}

async fn runner_state(app: &TestApp, name: &str) -> String {
    sqlx::query_scalar("SELECT state FROM runners WHERE name = $1")
        .bind(name)
        .fetch_one(app.db.store.pool())
        .await
        .unwrap()
}

/// A booting runner other than `except`.
async fn booting_runner(app: &TestApp, except: Option<&str>) -> Option<String> {
    sqlx::query_scalar::<_, String>(
        "SELECT name FROM runners WHERE state = 'booting' AND name IS DISTINCT FROM $1",
    )
    .bind(except)
    .fetch_optional(app.db.store.pool())
    .await
    .unwrap()
}

async fn moto_instance(ec2: &aws_sdk_ec2::Client, runner: &str) -> aws_sdk_ec2::types::Instance {
    let described = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:spot-runners:runner")
                .values(runner)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut instances: Vec<_> = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .cloned()
        .collect();
    assert_eq!(instances.len(), 1, "one instance for {runner}");
    instances.remove(0)
}

#[tokio::test]
async fn a_reclaimed_busy_runners_job_is_rerun_once_its_run_completes_on_an_on_demand_runner() {
    let (ec2, image) = moto::ec2_with_image().await;
    // A subnet not in the region's first AZ, so the AZ recorded can only
    // have come from EC2's placement of the instance.
    let subnets = ec2.describe_subnets().send().await.unwrap();
    let (subnet, subnet_az) = subnets
        .subnets()
        .iter()
        .filter_map(|s| Some((s.subnet_id()?.to_owned(), s.availability_zone()?.to_owned())))
        .max_by(|a, b| a.1.cmp(&b.1))
        .expect("moto has subnets");

    let github_mock = MockServer::start().await;
    let jit =
        base64::engine::general_purpose::STANDARD.encode(r#"{".runner":"x",".credentials":"y"}"#);
    for runner_id in [4242, 4243] {
        Mock::given(method("POST"))
            .and(path("/orgs/octo-org/actions/runners/generate-jitconfig"))
            .respond_with(ResponseTemplate::new(201).set_body_json(json!({
                "runner": {"id": runner_id, "name": "ignored", "os": "linux", "status": "offline", "busy": false, "labels": []},
                "encoded_jit_config": jit,
            })))
            .up_to_n_times(1)
            .expect(1)
            .mount(&github_mock)
            .await;
    }
    // GitHub answers a re-run request with 201 and an empty object.
    let rerun_path = format!("/repos/{REPO}/actions/jobs/{JOB}/rerun");
    let rerun_failed_path = format!("/repos/{REPO}/actions/runs/{RUN_ID}/rerun-failed-jobs");
    for (rerun, times) in [(&rerun_path, 1), (&rerun_failed_path, 0)] {
        Mock::given(method("POST"))
            .and(path(rerun.as_str()))
            .respond_with(ResponseTemplate::new(201).set_body_json(json!({})))
            .expect(times)
            .mount(&github_mock)
            .await;
    }
    let runs_path = format!("/repos/{REPO}/actions/runs/{RUN_ID}");
    let mut runs_api = runs_api_answers(&github_mock, run_object(1, "in_progress", None)).await;

    let cloud = ReclaimingCloud::new(spot_runners_aws::Ec2Cloud::from_env().await.unwrap());
    let app = spawn_on_real_adapters(&github_mock.uri(), Arc::new(cloud.clone()), CONTROLLER).await;
    // The defaults under test: spot, re-runs on on-demand, at most 2.
    sqlx::query(
        "INSERT INTO instance_profiles (name, labels, instance_types, image_id, subnet_ids, max_instances)
         VALUES ('kani', '{linux,x64,spot,kani}', '{c6i.4xlarge}', $1, ARRAY[$2], 5)",
    )
    .bind(&image)
    .bind(&subnet)
    .execute(app.db.store.pool())
    .await
    .unwrap();
    app.eventually("profile loaded", || async {
        !app.state.profiles.get().profiles.is_empty()
    })
    .await;

    // The run's two jobs are queued: ours, and one for a GitHub-hosted
    // runner that no profile serves.
    let proof = "Kani proof";
    for (delivery, body) in [
        ("q-777", job("queued", JOB, 1, proof, KANI, None, None)),
        (
            "q-778",
            job(
                "queued",
                OWN_FAILURE,
                1,
                "lint",
                &["ubuntu-latest"],
                None,
                None,
            ),
        ),
    ] {
        assert_eq!(
            app.deliver("workflow_job", delivery, &body).await.status(),
            202
        );
    }
    app.eventually("runner booting", || async {
        booting_runner(&app, None).await.is_some()
    })
    .await;
    let first = booting_runner(&app, None).await.unwrap();
    let spot = moto_instance(&ec2, &first).await;
    let instance_id = spot.instance_id().unwrap().to_owned();
    assert_eq!(
        spot.instance_lifecycle().map(|l| l.as_str()),
        Some("spot"),
        "moto's record: a spot instance"
    );
    assert_eq!(spot.subnet_id(), Some(subnet.as_str()));
    let placed_in = spot
        .placement()
        .and_then(|p| p.availability_zone())
        .unwrap()
        .to_owned();
    assert_eq!(placed_in, subnet_az);

    // GitHub hands our job to our runner; the other job fails on its own.
    let started = tokio::time::Instant::now();
    for (delivery, body) in [
        (
            "p-777",
            job(
                "in_progress",
                JOB,
                1,
                proof,
                KANI,
                Some((&first, 4242)),
                None,
            ),
        ),
        (
            "p-778",
            job(
                "in_progress",
                OWN_FAILURE,
                1,
                "lint",
                &["ubuntu-latest"],
                Some(("GitHub Actions 2", 2)),
                None,
            ),
        ),
        (
            "c-778",
            job(
                "completed",
                OWN_FAILURE,
                1,
                "lint",
                &["ubuntu-latest"],
                Some(("GitHub Actions 2", 2)),
                Some("failure"),
            ),
        ),
    ] {
        assert_eq!(
            app.deliver("workflow_job", delivery, &body).await.status(),
            202
        );
    }
    app.eventually("runner busy", || async {
        runner_state(&app, &first).await == "busy"
    })
    .await;

    // EC2 reclaims the busy runner's instance.
    cloud.reclaim(&instance_id).await.unwrap();
    let moto_state = moto_instance(&ec2, &first).await;
    assert!(
        matches!(
            moto_state
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str()),
            Some("shutting-down" | "terminated")
        ),
        "terminated on moto: {:?}",
        moto_state.state()
    );
    // The sweep notices on its own 10 s pace.
    let survival = || async {
        app.db
            .store
            .job_survival(JOB)
            .await
            .unwrap()
            .expect("the job is in the ledger")
    };
    app.eventually_within(
        "the job marked interrupted",
        Duration::from_secs(30),
        || async { survival().await.interrupted_at.is_some() },
    )
    .await;
    assert_eq!(runner_state(&app, &first).await, "interrupted");
    let survival = survival().await;
    assert_eq!(survival.interrupted_runner.as_deref(), Some(first.as_str()));
    assert_eq!(
        survival.interrupted_instance_type.as_deref(),
        Some("c6i.4xlarge")
    );
    assert_eq!(survival.interrupted_az.as_deref(), Some(placed_in.as_str()));
    assert_eq!(
        survival.interrupted_subnet_id.as_deref(),
        Some(subnet.as_str())
    );
    assert_eq!(survival.interrupted_market.as_deref(), Some("spot"));
    let ran = survival.interrupted_after_secs.expect("how long it ran");
    assert!(
        (0..=i32::try_from(started.elapsed().as_secs()).unwrap() + 1).contains(&ran),
        "ran {ran} s"
    );
    assert_eq!(survival.rerun_state.as_deref(), Some("pending"));
    assert_eq!(
        app.metrics()
            .interruptions_total
            .with_label_values(&["kani"])
            .get(),
        1
    );
    let other = app
        .db
        .store
        .job_survival(OWN_FAILURE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(other.interrupted_at, None, "failed on its own: not marked");

    // The service asks GitHub whether the run completed; it has not, so
    // nothing is re-run yet.
    app.eventually("GitHub asked about the run", || async {
        requests_to(&github_mock, "GET", &runs_path).await >= 1
    })
    .await;
    assert_eq!(requests_to(&github_mock, "POST", &rerun_path).await, 0);

    // GitHub fails the job it lost the runner of, then the run completes.
    assert_eq!(
        app.deliver(
            "workflow_job",
            "c-777",
            &job(
                "completed",
                JOB,
                1,
                proof,
                KANI,
                Some((&first, 4242)),
                Some("failure"),
            ),
        )
        .await
        .status(),
        202
    );
    assert_eq!(
        app.deliver("workflow_run", "run-completed-1", &run_completed())
            .await
            .status(),
        202
    );
    drop(runs_api);
    runs_api = runs_api_answers(&github_mock, run_object(1, "completed", Some("failure"))).await;

    app.eventually("the job re-run requested", || async {
        requests_to(&github_mock, "POST", &rerun_path).await >= 1
    })
    .await;
    app.eventually("the ledger says requested", || async {
        app.db
            .store
            .job_survival(JOB)
            .await
            .unwrap()
            .and_then(|s| s.rerun_state)
            .as_deref()
            == Some("requested")
    })
    .await;
    assert_eq!(requests_to(&github_mock, "POST", &rerun_path).await, 1);
    assert_eq!(
        requests_to(&github_mock, "POST", &rerun_failed_path).await,
        0,
        "rerun-failed-jobs would re-run the job that failed on its own"
    );
    assert_eq!(
        requests_to(
            &github_mock,
            "POST",
            &format!("/repos/{REPO}/actions/jobs/{OWN_FAILURE}/rerun")
        )
        .await,
        0
    );
    assert_eq!(
        app.metrics()
            .reruns_total
            .with_label_values(&["kani", "requested"])
            .get(),
        1
    );

    // GitHub starts attempt 2: the re-run is a new job of the same run.
    drop(runs_api);
    let _runs_api = runs_api_answers(&github_mock, run_object(2, "in_progress", None)).await;
    assert_eq!(
        app.deliver(
            "workflow_job",
            "q-779",
            &job("queued", RERUN, 2, proof, KANI, None, None)
        )
        .await
        .status(),
        202
    );
    app.eventually("a runner for the re-run", || async {
        booting_runner(&app, Some(&first)).await.is_some()
    })
    .await;
    let second = booting_runner(&app, Some(&first)).await.unwrap();
    let on_demand = moto_instance(&ec2, &second).await;
    assert_eq!(
        on_demand.instance_lifecycle(),
        None,
        "moto's record: no spot lifecycle"
    );
    assert_eq!(on_demand.spot_instance_request_id(), None);
    let (market, reason): (String, Option<String>) =
        sqlx::query_as("SELECT market, market_reason FROM runners WHERE name = $1")
            .bind(&second)
            .fetch_one(app.db.store.pool())
            .await
            .unwrap();
    assert_eq!(market, "on-demand");
    let reason = reason.unwrap();
    assert!(
        reason.contains("re-runs a job a spot reclaim interrupted"),
        "{reason}"
    );
    assert_eq!(
        app.metrics()
            .launches_total
            .with_label_values(&["kani", "on-demand", "launched"])
            .get(),
        1
    );

    // The re-run starts on that runner; `jobs explain` tells the story.
    assert_eq!(
        app.deliver(
            "workflow_job",
            "p-779",
            &job(
                "in_progress",
                RERUN,
                2,
                proof,
                KANI,
                Some((&second, 4243)),
                None
            ),
        )
        .await
        .status(),
        202
    );
    app.eventually("the re-run linked and its runner busy", || async {
        let linked = app
            .db
            .store
            .job_survival(JOB)
            .await
            .unwrap()
            .and_then(|s| s.rerun_state)
            .as_deref()
            == Some("rerun");
        linked && runner_state(&app, &second).await == "busy"
    })
    .await;
    let mut settings = common::settings(&app.db, SECRET);
    settings.controller_id = CONTROLLER.parse().unwrap();
    let explained = spot_runners::inspect::explain_job(&app.db.store, &settings, JOB)
        .await
        .unwrap();
    assert!(
        explained.contains(&format!(
            "on spot (c6i.4xlarge in {placed_in}, {subnet}, runner {first})"
        )),
        "{explained}"
    );
    assert!(
        explained.contains(&format!("re-run: rerun — re-run as job {RERUN}")),
        "{explained}"
    );
    let explained = spot_runners::inspect::explain_job(&app.db.store, &settings, RERUN)
        .await
        .unwrap();
    assert!(
        explained.contains(&format!("re-runs job {JOB} (re-run 1 of its lineage)")),
        "{explained}"
    );
    assert!(
        explained.contains("its runner ran on on-demand"),
        "{explained}"
    );
    assert_eq!(
        app.metrics()
            .jobs_lost_total
            .with_label_values(&["kani"])
            .get(),
        0
    );
    app.stop().await;
}
