//! `serve --simulate`: the real service on a test database with the
//! simulated EC2 and GitHub, fed signed webhooks over its own HTTP
//! endpoint. Real time, short: 1 s boots, a 2 s job.

mod common;

use std::time::Duration;

use spot_runners::simulation::{SimServeArgs, SimulatedService};
use spot_runners_domain::ports::InstanceState;
use spot_runners_sim::arrivals::JobSpec;
use spot_runners_sim::cloud::REASON_USER_TERMINATED;
use spot_runners_store::testing::test_database;

/// Polls `f` until it holds; fails after 20 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_simulated_job_is_launched_for_run_and_its_instance_terminated() {
    spot_runners::telemetry::init();
    let db = test_database().await.unwrap();
    // No webhook secret: the simulator makes one up and signs with it.
    let mut settings = common::settings(&db, "");
    settings.reconcile_interval = Duration::from_secs(1);
    let args = SimServeArgs {
        sim_jobs_per_minute: 0.0,
        sim_boot_secs: 1,
        sim_seed: Some(7),
        ..SimServeArgs::default()
    };
    let mut service = SimulatedService::build(settings, &args).await.unwrap();
    let job = service.submit(JobSpec {
        kind: "proofs".into(),
        repository: "acme/proofs".into(),
        labels: ["self-hosted", "Linux", "x64", "kani"]
            .map(str::to_owned)
            .to_vec(),
        duration: Duration::from_secs(2),
        matrix: None,
    });
    let cloud = service.cloud().clone();
    let metrics = std::sync::Arc::clone(&service.app().state().metrics);
    let pool = service.app().store().pool().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(service.run_until_stopped(async {
        let _ = stopped.await;
    }));

    eventually("an instance launched for the job", || {
        cloud.instances().len() == 1
    })
    .await;
    let accepted = |action: &str| {
        metrics
            .webhooks_total
            .with_label_values(&["workflow_job", action, "accepted"])
            .get()
    };
    eventually("in_progress accepted over HTTP", || {
        accepted("in_progress") == 1
    })
    .await;
    eventually("completed accepted over HTTP", || {
        accepted("completed") == 1
    })
    .await;
    // The service, not the instance's own shutdown (10 s later), ends it.
    eventually("the instance terminated by the service", || {
        let i = &cloud.instances()[0].instance;
        i.state == InstanceState::Terminated
            && i.state_reason.as_deref() == Some(REASON_USER_TERMINATED)
    })
    .await;

    let (status, runner): (String, Option<String>) =
        sqlx::query_as("SELECT status, runner_name FROM workflow_jobs WHERE id = $1")
            .bind(job)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "completed");
    let instance = &cloud.instances()[0];
    assert_eq!(
        runner.as_deref(),
        Some(instance.request.runner_name.as_str())
    );
    assert_eq!(accepted("queued"), 1);
    assert_eq!(
        metrics
            .webhooks_total
            .with_label_values(&["workflow_job", "completed", "bad_signature"])
            .get(),
        0
    );

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
