//! The JIT config's path through SSM Parameter Store (DESIGN.md, "Launching
//! on EC2"), on the fake cloud, GitHub and parameter store against a real
//! PostgreSQL: stored before the launch, granted to the instance alone,
//! never in user data; crashes at any step resume without a second instance
//! or a stale config; leftovers are swept. And the cost tags an
//! `in_progress` puts on its runner's instance.

mod common;

use std::sync::Arc;

use common::fleet::Harness;
use secrecy::SecretString;
use spot_runners_domain::parameters::{jit_parameter_name, TAG_INSTANCE_ARN};
use spot_runners_domain::ports::{Cloud, GitHub, JitRequest, ParameterStore, RunnerScope};
use spot_runners_reconciler::Reconciler;
use spot_runners_sim::cloud::{CloudCall, FAKE_ARN_PREFIX};
use spot_runners_sim::FakeGitHub;

fn parameter(runner: &str) -> String {
    jit_parameter_name("spot-runners", runner)
}

/// One queued job and the `requested` runner a pass planned for it.
async fn one_planned_runner() -> (Harness, Arc<Reconciler>, String) {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 5").await;
    h.queue("kani", 0..1).await;
    let r = h.reconciler(100);
    r.pass().await.unwrap();
    let name: String = sqlx::query_scalar("SELECT name FROM runners")
        .fetch_one(h.store.pool())
        .await
        .unwrap();
    (h, r, name)
}

async fn row(h: &Harness, name: &str) -> (String, Option<String>, Option<i64>) {
    sqlx::query_as("SELECT state, instance_id, github_runner_id FROM runners WHERE name = $1")
        .bind(name)
        .fetch_one(h.store.pool())
        .await
        .unwrap()
}

/// The config the instance reads, as its role may: only once granted to it.
fn read_as(h: &Harness, name: &str, instance_id: &str) -> String {
    h.parameters
        .read_as_instance(&parameter(name), &format!("{FAKE_ARN_PREFIX}{instance_id}"))
        .unwrap()
}

/// The runner row is `requested` and GitHub registered it, but the process
/// died before recording that: what it stored in SSM is still there.
async fn stale_config(h: &Harness, name: &str) -> i64 {
    let jit = h
        .github
        .generate_jit_config(
            &RunnerScope::Org("acme".into()),
            &JitRequest {
                name: name.to_owned(),
                runner_group_id: 1,
                labels: vec![],
            },
        )
        .await
        .unwrap();
    h.parameters
        .create_secure(&parameter(name), &jit.encoded)
        .await
        .unwrap();
    jit.runner_id
}

#[tokio::test]
async fn the_config_waits_in_ssm_granted_to_its_instance_and_never_in_user_data() {
    let (h, r, name) = one_planned_runner().await;
    while r.provision_batch().await.unwrap() > 0 {}
    let (state, instance, github_id) = row(&h, &name).await;
    assert_eq!(state, "booting");
    let instance = instance.unwrap();

    let config = read_as(&h, &name, &instance);
    assert_eq!(
        FakeGitHub::jit_runner_name(&config).as_deref(),
        Some(name.as_str())
    );
    assert_eq!(
        h.github
            .runners()
            .iter()
            .find(|g| g.name == name)
            .map(|g| g.id),
        github_id
    );
    // Granted to this instance alone.
    assert!(h
        .parameters
        .read_as_instance(
            &parameter(&name),
            &format!("{FAKE_ARN_PREFIX}i-0000000000000000f")
        )
        .is_err());
    assert_eq!(
        h.parameters.tags(&parameter(&name)).get(TAG_INSTANCE_ARN),
        Some(&format!("{FAKE_ARN_PREFIX}{instance}"))
    );
    let user_data = h.cloud.user_data(&instance).unwrap();
    assert!(!user_data.contains(&config), "no secret in user data");
    assert!(user_data.contains(&format!("RUNNER_NAME='{name}'")));
}

/// A crash between PutParameter and the ledger's `registered`: the row is
/// `requested`, GitHub has the registration, SSM the config. The resumed
/// row replaces both (the 409 path, then a fresh parameter) and launches once.
#[tokio::test]
async fn a_crash_after_put_parameter_replaces_the_stale_config_and_launches_once() {
    let (h, r, name) = one_planned_runner().await;
    let stale_id = stale_config(&h, &name).await;
    let stale = h
        .parameters
        .read_as_instance(&parameter(&name), "nobody")
        .unwrap_err();
    assert_eq!(stale.code, "AccessDeniedException", "not granted to anyone");

    while r.provision_batch().await.unwrap() > 0 {}
    let (state, instance, github_id) = row(&h, &name).await;
    assert_eq!(state, "booting");
    assert_eq!(h.cloud.launch_attempts(), 1);
    let registered: Vec<_> = h
        .github
        .runners()
        .into_iter()
        .filter(|g| g.name == name)
        .collect();
    assert_eq!(registered.len(), 1);
    assert_ne!(Some(stale_id), github_id);
    assert_eq!(registered[0].id, github_id.unwrap());
    // The config the instance reads is the live registration's.
    let config = read_as(&h, &name, &instance.unwrap());
    assert_eq!(
        FakeGitHub::jit_runner_name(&config).as_deref(),
        Some(name.as_str())
    );
    assert_eq!(h.parameters.names(), [parameter(&name)]);
    assert_eq!(
        h.parameters.creates(),
        2,
        "the stale one, then its replacement"
    );
}

/// A crash after `registered` (config in SSM) and before RunInstances: the
/// row resumes with a new registration and a new config, one instance.
#[tokio::test]
async fn a_crash_between_put_parameter_and_run_instances_launches_once_with_a_fresh_config() {
    let (h, _, name) = one_planned_runner().await;
    let stale_id = stale_config(&h, &name).await;
    h.sql(&format!(
        "UPDATE runners SET state = 'registered', github_runner_id = {stale_id}, lease_owner = 'dead', lease_until = now() - interval '1 s'"
    ))
    .await;
    let r2 = h.reconciler(100);
    while r2.provision_batch().await.unwrap() > 0 {}

    let (state, instance, github_id) = row(&h, &name).await;
    assert_eq!(state, "booting");
    assert_eq!(h.cloud.launch_attempts(), 1);
    assert_ne!(github_id, Some(stale_id));
    let registered: Vec<_> = h
        .github
        .runners()
        .into_iter()
        .filter(|g| g.name == name)
        .collect();
    assert_eq!(registered.len(), 1, "the stale registration is gone");
    let config = read_as(&h, &name, &instance.unwrap());
    assert_eq!(
        FakeGitHub::jit_runner_name(&config).as_deref(),
        Some(name.as_str())
    );
    assert_eq!(h.parameters.names(), [parameter(&name)]);
}

/// A crash during RunInstances that started no instance: the interrupted
/// attempt is resumed with its own ClientToken, under a new registration
/// whose config replaces the stale one; nothing of the old one is left.
#[tokio::test]
async fn a_launch_lost_in_a_crash_is_resumed_with_a_fresh_config() {
    let (h, _, name) = one_planned_runner().await;
    let stale_id = stale_config(&h, &name).await;
    h.sql(&format!(
        "UPDATE runners SET state = 'launching', github_runner_id = {stale_id}, lease_owner = 'dead', lease_until = now() - interval '1 s'"
    ))
    .await;
    let r2 = h.reconciler(100);
    while r2.provision_batch().await.unwrap() > 0 {}
    let (state, instance, github_id) = row(&h, &name).await;
    assert_eq!(state, "booting");
    assert_eq!(h.cloud.launch_attempts(), 1);
    assert_ne!(github_id, Some(stale_id));
    assert!(
        h.github.runners().iter().all(|g| g.id != stale_id),
        "the stale registration is gone"
    );
    let config = read_as(&h, &name, &instance.unwrap());
    assert_eq!(
        FakeGitHub::jit_runner_name(&config).as_deref(),
        Some(name.as_str())
    );
    assert_eq!(h.parameters.names(), [parameter(&name)]);
}

/// A crash during RunInstances left an instance, but its config parameter
/// is gone (deleted by hand): the instance can never register, so its
/// runner ends at once instead of waiting for a grant forever, and the
/// sweep terminates the instance as an orphan.
#[tokio::test]
async fn an_adopted_instance_whose_config_is_gone_ends_its_runner() {
    let (h, r, name) = one_planned_runner().await;
    h.cloud
        .launch(&common::fleet::launch_request("spot-runners", &name))
        .await
        .unwrap();
    h.sql("UPDATE runners SET state = 'launching', github_runner_id = 1, lease_until = now() - interval '1 s'")
        .await;
    while r.provision_batch().await.unwrap() > 0 {}
    assert_eq!(h.cloud.launch_attempts(), 1, "no second RunInstances");
    let code: Option<String> =
        sqlx::query_scalar("SELECT last_error_code FROM runners WHERE name = $1")
            .bind(&name)
            .fetch_one(h.store.pool())
            .await
            .unwrap();
    assert_eq!(row(&h, &name).await.0, "launch_failed");
    assert_eq!(code.as_deref(), Some("JitConfigGone"));
}

/// A crash after RunInstances answered, before the grant: the adopted
/// instance is granted its config, and nothing is launched again.
#[tokio::test]
async fn an_adopted_instance_is_granted_its_config() {
    let (h, r, name) = one_planned_runner().await;
    let github_id = stale_config(&h, &name).await;
    let instance = h
        .cloud
        .launch(&common::fleet::launch_request("spot-runners", &name))
        .await
        .unwrap();
    h.sql(&format!(
        "UPDATE runners SET state = 'launching', github_runner_id = {github_id}, lease_until = now() - interval '1 s'"
    ))
    .await;
    while r.provision_batch().await.unwrap() > 0 {}
    assert_eq!(h.cloud.launch_attempts(), 1, "no second RunInstances");
    assert_eq!(row(&h, &name).await.0, "booting");
    let config = read_as(&h, &name, &instance.id);
    assert_eq!(
        FakeGitHub::jit_runner_name(&config).as_deref(),
        Some(name.as_str())
    );
}

/// SSM refuses the grant right after the launch: the row stays
/// `launching` with its registration and config, and the next claim
/// adopts the instance and grants it. One instance, one registration.
#[tokio::test]
async fn a_failed_grant_is_retried_by_adopting_the_instance() {
    let (h, r, name) = one_planned_runner().await;
    h.parameters.fail_next_tag("AccessDeniedException");
    while r.provision_batch().await.unwrap() > 0 {}
    let (state, instance, github_id) = row(&h, &name).await;
    assert_eq!(state, "launching");
    assert!(instance.is_none());
    assert!(github_id.is_some());
    assert!(
        h.github.runners().iter().any(|g| g.name == name),
        "registration kept"
    );
    assert_eq!(h.parameters.names(), [parameter(&name)], "config kept");

    h.sql("UPDATE runners SET lease_until = now() - interval '1 s'")
        .await;
    while r.provision_batch().await.unwrap() > 0 {}
    let (state, instance, _) = row(&h, &name).await;
    assert_eq!(state, "booting");
    assert_eq!(h.cloud.launch_attempts(), 1);
    let config = read_as(&h, &name, &instance.unwrap());
    assert_eq!(
        FakeGitHub::jit_runner_name(&config).as_deref(),
        Some(name.as_str())
    );
}

/// The sweep deletes every config no instance will read: of a runner
/// online already, of one that ended, of one the ledger never had. A
/// booting runner's stays.
#[tokio::test]
async fn the_sweep_deletes_configs_left_behind_and_keeps_those_still_needed() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 5").await;
    h.queue("kani", 0..3).await;
    let r = h.reconciler(100);
    h.reconcile(&r).await;
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM runners ORDER BY name")
        .fetch_all(h.store.pool())
        .await
        .unwrap();
    assert_eq!(names.len(), 3);
    // One online (its boot script could not delete its config), one ended.
    h.github.set_online(&names[0], true);
    h.sql(&format!(
        "UPDATE runners SET state = 'launch_failed' WHERE name = '{}'",
        names[1]
    ))
    .await;
    let unknown = parameter("spot-runners-kani-zzzz9999");
    h.parameters
        .create_secure(&unknown, &SecretString::from("eA==".to_owned()))
        .await
        .unwrap();
    assert_eq!(h.parameters.names().len(), 4);

    let report = r.sweep().await.unwrap().unwrap();
    assert_eq!(report.leftover_parameters, 3);
    assert_eq!(h.parameters.names(), [parameter(&names[2])]);
    assert!(h
        .metrics
        .render()
        .contains(r#"spot_runners_orphans_total{kind="jit_parameter"} 3"#));
    // Nothing more to do.
    assert_eq!(r.sweep().await.unwrap().unwrap().leftover_parameters, 0);
}

/// `in_progress` names the runner: its instance gets the job's repository
/// and workflow as tags, once.
#[tokio::test]
async fn in_progress_puts_cost_tags_on_the_runners_instance_once() {
    let (h, r, name) = one_planned_runner().await;
    while r.provision_batch().await.unwrap() > 0 {}
    let instance = row(&h, &name).await.1.unwrap();
    h.sql(&format!(
        "UPDATE workflow_jobs SET status = 'in_progress', runner_name = '{name}', in_progress_at = now(), workflow_name = 'Kani proofs'"
    ))
    .await;
    r.pass().await.unwrap();
    assert_eq!(row(&h, &name).await.0, "busy");
    assert!(
        h.cloud.added_tags(&instance).is_empty(),
        "nothing before the sweep"
    );

    let report = r.sweep().await.unwrap().unwrap();
    assert_eq!(report.cost_tagged, 1);
    let tags = h.cloud.added_tags(&instance);
    assert_eq!(
        tags.get("spot-runners:repository").map(String::as_str),
        Some("acme/proofs")
    );
    assert_eq!(
        tags.get("spot-runners:workflow").map(String::as_str),
        Some("Kani proofs")
    );
    assert_eq!(tags.len(), 2, "only the cost tags: {tags:?}");

    assert_eq!(r.sweep().await.unwrap().unwrap().cost_tagged, 0);
    let tag_calls = h
        .cloud
        .calls()
        .into_iter()
        .filter(|c| matches!(c, CloudCall::Tag { .. }))
        .count();
    assert_eq!(tag_calls, 1);
}
