//! Provisioning on the fake cloud and fake GitHub (what emulators cannot
//! do: EC2's token bucket, capacity errors, ClientToken de-duplication,
//! crashes), against a real PostgreSQL. The fake enforces EC2's real token
//! bucket, so the 200-runner burst takes EC2's own ~100 s: tokio's paused
//! clock cannot be used beside real database IO.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fleet::{terminations, Harness};
use spot_runners_domain::names::client_token;
use spot_runners_domain::ports::{
    Cloud, GitHub, JitRequest, LaunchRequest, ParameterStore, RunnerScope,
};
use spot_runners_domain::{ImageSource, Market};
use spot_runners_reconciler::Reconciler;
use spot_runners_sim::cloud::CloudCall;
use spot_runners_sim::FakeCloud;

/// (instance type, subnet, market, instance id or EC2 error code)
type Attempt = (String, Option<String>, Market, Result<String, String>);

/// The `ClientToken` of every `RunInstances`, in order.
fn tokens(cloud: &FakeCloud) -> Vec<String> {
    cloud
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            CloudCall::Launch { client_token, .. } => Some(client_token),
            _ => None,
        })
        .collect()
}

fn launches(cloud: &FakeCloud) -> Vec<Attempt> {
    cloud
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            CloudCall::Launch {
                instance_type,
                subnet_id,
                market,
                outcome,
                ..
            } => Some((instance_type, subnet_id, market, outcome)),
            CloudCall::Terminate { .. } | CloudCall::Tag { .. } => None,
        })
        .collect()
}

#[tokio::test]
async fn a_burst_of_200_launches_exactly_200_and_retries_what_ec2_throttles() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 500").await;
    h.queue("kani", 0..200).await;
    let r = h.reconciler(1000);
    h.reconcile(&r).await;

    let (launched, refused): (Vec<_>, Vec<_>) =
        launches(&h.cloud).into_iter().partition(|l| l.3.is_ok());
    // The client paces itself by EC2's bucket, here in real time: on a
    // starved machine one call can still reach an empty bucket. Such a
    // refusal is retried, never lost or doubled. That the pacing avoids
    // them at all is a timing, measured by the burst benchmark
    // (docs/benchmarks.md, "no RequestLimitExceeded").
    assert!(
        refused
            .iter()
            .all(|l| l.3 == Err("RequestLimitExceeded".to_owned())),
        "{refused:?}"
    );
    assert_eq!(h.cloud.throttled_count(), refused.len() as u64);
    assert_eq!(launched.len(), 200);
    let mut instances: Vec<_> = launched.iter().map(|l| l.3.clone().unwrap()).collect();
    instances.sort();
    instances.dedup();
    assert_eq!(instances.len(), 200, "200 distinct instances");
    assert_eq!(h.cloud.live_count(Some("kani")), 200);
    assert_eq!(h.github.runners().len(), 200);
    assert_eq!(h.states().await, [("booting".to_owned(), 200)]);
    // Every runner registered with self-hosted plus the profile's labels.
    assert!(h
        .github
        .runners()
        .iter()
        .all(|g| g.labels == ["self-hosted", "linux", "x64", "kani"]));

    // Another pass converges: nothing new.
    let attempts = h.cloud.launch_attempts();
    h.reconcile(&r).await;
    assert_eq!(h.cloud.launch_attempts(), attempts);
}

#[tokio::test]
async fn a_profile_capped_at_5_never_has_a_sixth_instance() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 5").await;
    h.queue("kani", 0..20).await;
    let r = h.reconciler(100);
    for _ in 0..3 {
        h.reconcile(&r).await;
    }
    assert_eq!(h.cloud.peak_live("kani"), 5);
    assert_eq!(h.cloud.launch_attempts(), 5);
}

#[tokio::test]
async fn the_global_cap_holds_across_profiles() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 50, priority = 1").await;
    h.profile("bench", "max_instances = 50, labels = '{linux,x64,bench}'")
        .await;
    h.queue("kani", 0..8).await;
    h.queue("bench", 100..108).await;
    let r = h.reconciler(10);
    h.reconcile(&r).await;
    assert_eq!(h.cloud.peak_live_total(), 10);
    assert_eq!(h.cloud.live_count(Some("kani")), 8, "priority first");
}

#[tokio::test]
async fn capacity_errors_walk_types_and_subnets_then_fall_back_to_on_demand() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 5").await;
    for t in ["c6i.4xlarge", "c6a.4xlarge"] {
        for s in ["subnet-a", "subnet-b"] {
            h.cloud.set_capacity(t, Some(s), Market::Spot, Some(0));
        }
    }
    h.queue("kani", 0..1).await;
    let r = h.reconciler(100);
    h.reconcile(&r).await;
    let walk: Vec<String> = launches(&h.cloud)
        .into_iter()
        .map(|(t, s, m, o)| format!("{t}/{}/{m}/{}", s.unwrap(), o.is_ok()))
        .collect();
    assert_eq!(
        walk,
        [
            "c6i.4xlarge/subnet-a/spot/false",
            "c6i.4xlarge/subnet-b/spot/false",
            "c6a.4xlarge/subnet-a/spot/false",
            "c6a.4xlarge/subnet-b/spot/false",
            "c6i.4xlarge/subnet-a/on-demand/true",
        ]
    );
    // EC2 remembers a token with the parameters of the request that used
    // it, even one refused for capacity: each attempt needs its own.
    let name: String = sqlx::query_scalar("SELECT name FROM runners")
        .fetch_one(h.store.pool())
        .await
        .unwrap();
    let expected: Vec<String> = (0..5).map(|a| client_token(&name, a)).collect();
    assert_eq!(tokens(&h.cloud), expected);
    assert_eq!(
        expected[0], name,
        "the first attempt's token is the runner name"
    );
    let text = h.metrics.render();
    assert!(text.contains(
        r#"spot_runners_launch_errors_total{code="InsufficientInstanceCapacity",profile="kani"} 4"#
    ));
    assert!(text.contains(
        r#"spot_runners_launches_total{market="on-demand",outcome="launched",profile="kani"} 1"#
    ));
}

#[tokio::test]
async fn without_on_demand_fallback_an_exhausted_profile_fails_cleanly() {
    let h = Harness::new().await;
    h.profile(
        "kani",
        "on_demand_fallback = false, instance_types = '{c6i.4xlarge}', subnet_ids = '{}'",
    )
    .await;
    h.cloud
        .set_capacity("c6i.4xlarge", None, Market::Spot, Some(0));
    h.queue("kani", 0..1).await;
    let r = h.reconciler(100);
    r.pass().await.unwrap();
    r.provision_batch().await.unwrap();
    assert_eq!(h.states().await, [("launch_failed".to_owned(), 1)]);
    assert!(h.github.runners().is_empty(), "the registration is deleted");
    let code: String = sqlx::query_scalar("SELECT last_error_code FROM runners")
        .fetch_one(h.store.pool())
        .await
        .unwrap();
    assert_eq!(code, "InsufficientInstanceCapacity");
    // The demand is still there: the next pass asks for a new runner.
    assert_eq!(r.pass().await.unwrap().requested, 1);
}

#[tokio::test]
async fn throttling_is_retried_with_backoff() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 5").await;
    h.cloud.fail_next("RequestLimitExceeded");
    h.cloud.fail_next("RequestLimitExceeded");
    h.queue("kani", 0..1).await;
    let r = h.reconciler(100);
    h.reconcile(&r).await;
    let outcomes: Vec<bool> = launches(&h.cloud)
        .into_iter()
        .map(|l| l.3.is_ok())
        .collect();
    assert_eq!(outcomes, [false, false, true]);
    assert_eq!(h.cloud.live_count(None), 1);
}

#[tokio::test]
async fn an_invalid_request_ends_the_runner_without_walking_on() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 5").await;
    h.cloud.fail_next("InvalidAMIID.NotFound");
    h.queue("kani", 0..1).await;
    let r = h.reconciler(100);
    r.pass().await.unwrap();
    r.provision_batch().await.unwrap();
    assert_eq!(h.cloud.launch_attempts(), 1);
    assert_eq!(h.states().await, [("launch_failed".to_owned(), 1)]);
    assert!(h.github.runners().is_empty());
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

impl Harness {
    /// What a process that crashed right after GitHub's answer left behind.
    async fn register_at_github(&self, name: &str) -> spot_runners_domain::ports::JitConfig {
        let request = JitRequest {
            name: name.to_owned(),
            runner_group_id: 1,
            labels: vec![],
        };
        self.github
            .generate_jit_config(&RunnerScope::Org("acme".into()), &request)
            .await
            .unwrap()
    }
}

/// A crash between GitHub's answer and the ledger write: the runner exists
/// at GitHub, the row still says `requested`. The retry hits 409, deletes
/// the old registration and registers again.
#[tokio::test]
async fn a_crash_after_the_jit_call_is_healed_by_the_409_path() {
    let (h, r, name) = one_planned_runner().await;
    let stale = h.register_at_github(&name).await;
    while r.provision_batch().await.unwrap() > 0 {}
    let registered: Vec<_> = h
        .github
        .runners()
        .into_iter()
        .filter(|g| g.name == name)
        .collect();
    assert_eq!(registered.len(), 1);
    assert_ne!(registered[0].id, stale.runner_id);
    assert_eq!(h.cloud.live_count(None), 1);
}

/// A crash after the ledger said `registered` but before `RunInstances`:
/// the JIT config is lost, so the registration is replaced; one instance.
#[tokio::test]
async fn a_crash_between_the_jit_call_and_run_instances_launches_once() {
    let (h, _, name) = one_planned_runner().await;
    let jit = h.register_at_github(&name).await;
    h.sql(&format!(
        "UPDATE runners SET state = 'registered', github_runner_id = {}, lease_owner = 'dead', lease_until = now() - interval '1 s'",
        jit.runner_id
    ))
    .await;
    // A new process (a second reconciler) resumes the row.
    let r2 = h.reconciler(100);
    while r2.provision_batch().await.unwrap() > 0 {}
    assert_eq!(h.cloud.launch_attempts(), 1);
    assert_eq!(h.cloud.live_count(None), 1);
    let gh: Vec<_> = h
        .github
        .runners()
        .into_iter()
        .filter(|g| g.name == name)
        .collect();
    assert_eq!(
        gh.len(),
        1,
        "the lost registration was replaced, not duplicated"
    );
    assert_ne!(gh[0].id, jit.runner_id);
    assert_eq!(h.states().await, [("booting".to_owned(), 1)]);
    // No new demand-less runner: the next pass changes nothing.
    h.reconcile(&r2).await;
    assert_eq!(h.cloud.launch_attempts(), 1);
}

/// A crash during `RunInstances`: the instance exists but the ledger still
/// says `launching`. The resumed row adopts it instead of launching again.
#[tokio::test]
async fn a_crash_during_run_instances_adopts_the_instance() {
    let (h, r, name) = one_planned_runner().await;
    let instance = h
        .cloud
        .launch(&common::fleet::launch_request("spot-runners", &name))
        .await
        .unwrap();
    // The crash came after the config was stored (it is stored before
    // `registered`), so the adopted instance can be granted it.
    h.parameters
        .create_secure(
            &spot_runners_domain::parameters::jit_parameter_name("spot-runners", &name),
            &secrecy::SecretString::from("jit-config"),
        )
        .await
        .unwrap();
    h.sql("UPDATE runners SET state = 'launching', github_runner_id = 1, lease_until = now() - interval '1 s'")
        .await;
    while r.provision_batch().await.unwrap() > 0 {}
    assert_eq!(h.cloud.launch_attempts(), 1, "no second RunInstances");
    let adopted: String =
        sqlx::query_scalar("SELECT instance_id FROM runners WHERE state = 'booting'")
            .fetch_one(h.store.pool())
            .await
            .unwrap();
    assert_eq!(adopted, instance.id);
}

impl Harness {
    /// What a process left behind that crashed in the walk of `name` with
    /// attempt 0 refused for capacity and attempt 1 (c6i.4xlarge in
    /// subnet-b) recorded as `launching`; `attempt_1_reached_ec2` says
    /// whether that call got to EC2 (and was refused for capacity too).
    async fn crash_in_attempt_1(&self, name: &str, attempt_1_reached_ec2: bool) {
        let jit = self.register_at_github(name).await;
        let request = |attempt: u32, subnet: &str| LaunchRequest {
            runner_name: name.to_owned(),
            client_token: client_token(name, attempt),
            controller_id: "spot-runners".into(),
            profile: "kani".into(),
            instance_type: "c6i.4xlarge".into(),
            subnet_id: Some(subnet.into()),
            image: ImageSource::Id("ami-1".into()),
            threads_per_core: None,
            security_group_ids: vec![],
            iam_instance_profile: None,
            market: Market::Spot,
            root_volume_gb: 64,
            user_data: "#!/bin/bash\n# the crashed process's JIT config".into(),
        };
        self.cloud
            .set_capacity("c6i.4xlarge", Some("subnet-a"), Market::Spot, Some(0));
        let refused = self
            .cloud
            .launch(&request(0, "subnet-a"))
            .await
            .unwrap_err();
        assert_eq!(refused.code, "InsufficientInstanceCapacity");
        if attempt_1_reached_ec2 {
            self.cloud
                .set_capacity("c6i.4xlarge", Some("subnet-b"), Market::Spot, Some(0));
            self.cloud
                .launch(&request(1, "subnet-b"))
                .await
                .unwrap_err();
            self.cloud
                .set_capacity("c6i.4xlarge", Some("subnet-b"), Market::Spot, None);
        }
        self.sql(&format!(
            "UPDATE runners SET state = 'launching', github_runner_id = {}, instance_type = 'c6i.4xlarge',
                    subnet_id = 'subnet-b', market = 'spot', lease_owner = 'dead', lease_until = now() - interval '1 s'",
            jit.runner_id
        ))
        .await;
    }
}

/// A crash during the fallback walk, before attempt 1's `RunInstances`
/// reached EC2: the resumed row goes on with attempt 1 and its own token,
/// instead of giving the runner up or starting the walk over.
#[tokio::test]
async fn a_crash_mid_walk_resumes_its_attempt_with_the_attempts_token() {
    let (h, _, name) = one_planned_runner().await;
    h.crash_in_attempt_1(&name, false).await;
    let r2 = h.reconciler(100);
    while r2.provision_batch().await.unwrap() > 0 {}

    let after: Vec<_> = launches(&h.cloud).into_iter().skip(1).collect();
    assert_eq!(
        after,
        [(
            "c6i.4xlarge".to_owned(),
            Some("subnet-b".to_owned()),
            Market::Spot,
            Ok(h.cloud.instances()[0].instance.id.clone())
        )]
    );
    assert_eq!(tokens(&h.cloud), [name.clone(), client_token(&name, 1)]);
    let (state, instance): (String, String) =
        sqlx::query_as("SELECT state, instance_id FROM runners WHERE name = $1")
            .bind(&name)
            .fetch_one(h.store.pool())
            .await
            .unwrap();
    assert_eq!(state, "booting", "the same runner, resumed");
    assert_eq!(instance, h.cloud.instances()[0].instance.id);
    assert_eq!(h.cloud.live_count(None), 1);
}

/// The same crash after attempt 1 did reach EC2: its token is remembered
/// with the crashed process's request, so EC2 refuses the resumed one
/// (`IdempotentParameterMismatch`). That is no verdict on the profile: no
/// instance carries the runner's tag, so the walk goes on to attempt 2.
#[tokio::test]
async fn a_spent_token_moves_the_walk_on_instead_of_failing_the_runner() {
    let (h, _, name) = one_planned_runner().await;
    h.crash_in_attempt_1(&name, true).await;
    let r2 = h.reconciler(100);
    while r2.provision_batch().await.unwrap() > 0 {}

    let walk: Vec<String> = launches(&h.cloud)
        .into_iter()
        .skip(2)
        .map(|(t, s, _, o)| {
            format!(
                "{t}/{}/{}",
                s.unwrap(),
                o.map(|_| "ok".into()).unwrap_or_else(|e| e)
            )
        })
        .collect();
    assert_eq!(
        walk,
        [
            "c6i.4xlarge/subnet-b/IdempotentParameterMismatch",
            "c6a.4xlarge/subnet-a/ok"
        ]
    );
    assert_eq!(
        tokens(&h.cloud)[2..],
        [client_token(&name, 1), client_token(&name, 2)]
    );
    assert_eq!(h.states().await, [("booting".to_owned(), 1)]);
}

/// A profile whose AMI does not exist: the first failure backs it off, so
/// ten passes in 20 s register (and delete) one JIT runner, not ten; once
/// the delay has passed it is tried again, and an edit of the row at once.
#[tokio::test]
async fn a_profile_that_cannot_launch_backs_off() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 5, image_id = 'ami-0gone'")
        .await;
    h.cloud.remove_image("ami-0gone");
    h.queue("kani", 0..1).await;
    let r = h.reconciler(100);
    for _ in 0..10 {
        h.reconcile(&r).await;
        h.clock.advance(Duration::from_secs(2));
    }
    assert_eq!(
        h.github.jit_calls(),
        1,
        "one registration, not one per pass"
    );
    assert_eq!(h.cloud.launch_attempts(), 1);
    assert!(
        h.github.runners().is_empty(),
        "its registration was deleted"
    );
    let codes: Vec<String> =
        sqlx::query_scalar("SELECT last_error_code FROM runners ORDER BY created_at")
            .fetch_all(h.store.pool())
            .await
            .unwrap();
    assert_eq!(codes, ["InvalidAMIID.NotFound"]);

    // 30 s after the failure: one more try, then 60 s of quiet.
    h.clock.advance(Duration::from_secs(11));
    h.reconcile(&r).await;
    assert_eq!(h.github.jit_calls(), 2);
    h.clock.advance(Duration::from_secs(59));
    h.reconcile(&r).await;
    assert_eq!(h.github.jit_calls(), 2);

    // Fixing the row is tried at once.
    h.sql("UPDATE instance_profiles SET image_id = 'ami-0fixed' WHERE name = 'kani'")
        .await;
    h.profiles
        .reload(h.store.as_ref(), h.metrics.as_ref())
        .await
        .unwrap();
    h.reconcile(&r).await;
    assert_eq!(h.github.jit_calls(), 3);
    assert_eq!(h.cloud.live_count(None), 1);
}

/// What can be checked without GitHub or EC2 is: a placeholder AMI id
/// registers nothing at GitHub, and backs the profile off.
#[tokio::test]
async fn a_profile_with_a_placeholder_ami_registers_nothing() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 5, image_id = 'ami-REPLACE_ME'")
        .await;
    h.queue("kani", 0..3).await;
    let r = h.reconciler(100);
    for _ in 0..3 {
        h.reconcile(&r).await;
        h.clock.advance(Duration::from_secs(2));
    }
    assert_eq!(h.github.jit_calls(), 0);
    assert_eq!(h.cloud.launch_attempts(), 0);
    let ended: Vec<(String, String)> =
        sqlx::query_as("SELECT last_error_code, reason FROM runners ORDER BY name")
            .fetch_all(h.store.pool())
            .await
            .unwrap();
    // The first to fail backs the profile off; the others of its batch
    // may already find it backed off.
    assert!(ended
        .iter()
        .any(|(c, r)| c == "InvalidProfile" && r.contains("ami-REPLACE_ME")));
    assert!(
        ended
            .iter()
            .all(|(c, _)| c == "InvalidProfile" || c == "ProfileBackedOff"),
        "{ended:?}"
    );
    // The three runners of the first pass ended; none after it.
    assert_eq!(h.states().await, [("launch_failed".to_owned(), 3)]);
}

#[tokio::test]
async fn two_replicas_on_one_database_never_launch_the_same_demand_twice() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 100").await;
    h.queue("kani", 0..40).await;
    let (a, b) = (h.reconciler(100), h.reconciler(100));
    let booting = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM runners WHERE state = 'booting'")
            .fetch_one(h.store.pool())
            .await
            .unwrap()
    };
    // Both replicas work until the demand is covered; rows one of them
    // postpones (shared rate limits) are picked up again by either.
    let run = |r: Arc<Reconciler>| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while booting().await < 40 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "demand not covered in time"
            );
            r.pass().await.unwrap();
            while r.provision_batch().await.unwrap() > 0 {}
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::join!(run(a), run(b));
    // Two clients share EC2's one bucket, so some calls are throttled and
    // retried; what must hold is one instance per unit of demand.
    assert_eq!(h.cloud.live_count(None), 40);
    let mut names: Vec<String> = h
        .cloud
        .instances()
        .into_iter()
        .map(|i| i.request.runner_name)
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 40, "no runner has two instances");
    assert_eq!(h.states().await, [("booting".to_owned(), 40)]);
    assert_eq!(h.github.runners().len(), 40);
}

#[tokio::test]
async fn unmatched_jobs_are_rematched_when_a_profile_appears() {
    let h = Harness::new().await;
    h.sql(
        "INSERT INTO workflow_jobs (id, run_id, repository, owner, org, labels, status, match_error, queued_at)
         VALUES (1, 1, 'acme/p', 'acme', 'acme', '{self-hosted,kani}', 'queued', 'no profile', now())",
    )
    .await;
    let r = h.reconciler(100);
    assert_eq!(r.pass().await.unwrap().requested, 0);
    h.profile("kani", "max_instances = 5").await;
    // Re-matching runs at the sweeps' pace, not on every webhook.
    h.clock.advance(Duration::from_secs(10));
    let report = r.pass().await.unwrap();
    assert_eq!((report.rematched, report.requested), (1, 1));
}

/// in_progress names our runner → busy; completed → TerminateInstances at
/// once → terminating; the instance gone → terminated.
#[tokio::test]
async fn a_completed_job_terminates_its_instance_at_once() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 5").await;
    h.queue("kani", 0..1).await;
    let r = h.reconciler(100);
    h.reconcile(&r).await;
    let (name, instance): (String, String) =
        sqlx::query_as("SELECT name, instance_id FROM runners")
            .fetch_one(h.store.pool())
            .await
            .unwrap();
    h.sql(&format!(
        "UPDATE workflow_jobs SET status = 'in_progress', runner_name = '{name}', in_progress_at = now() WHERE id = 0"
    ))
    .await;
    r.pass().await.unwrap();
    assert_eq!(h.states().await, [("busy".to_owned(), 1)]);
    assert_eq!(h.cloud.live_count(None), 1, "a busy runner is never reaped");

    h.sql("UPDATE workflow_jobs SET status = 'completed', completed_at = now() WHERE id = 0")
        .await;
    let report = r.pass().await.unwrap();
    assert_eq!(report.terminated, 1);
    assert_eq!(terminations(&h.cloud), [vec![instance]]);
    assert_eq!(report.requested, 0, "no demand left, nothing launched");
    assert_eq!(h.states().await, [("terminating".to_owned(), 1)]);
    // The fake ends instances at once; the next sweep sees it gone.
    let sweep = r.sweep().await.unwrap().expect("the only replica leads");
    assert_eq!(sweep.gone, 1);
    assert_eq!(h.states().await, [("terminated".to_owned(), 1)]);
    assert!(h
        .metrics
        .render()
        .contains(r#"spot_runners_reaps_total{profile="kani",reason="completed"} 1"#));
}

/// A spot reclaim before the job started: the runner is marked
/// interrupted and the still-queued job gets a new runner.
#[tokio::test]
async fn a_reclaimed_instance_is_replaced_while_its_job_is_still_queued() {
    let h = Harness::new().await;
    h.profile("kani", "max_instances = 5").await;
    h.queue("kani", 0..1).await;
    let r = h.reconciler(100);
    h.reconcile(&r).await;
    let instance: String = sqlx::query_scalar("SELECT instance_id FROM runners")
        .fetch_one(h.store.pool())
        .await
        .unwrap();
    assert!(h.cloud.interrupt(&instance));
    h.reconcile(&r).await;
    assert_eq!(
        h.states().await,
        [("booting".to_owned(), 1), ("interrupted".to_owned(), 1)]
    );
    assert_eq!(h.cloud.live_count(None), 1);
    assert!(h
        .metrics
        .render()
        .contains(r#"spot_runners_orphans_total{kind="ledger_runner"} 1"#));
}

/// A profile that names its AMI by filter: while no image matches, the
/// profile backs off with a reason that names the filter; once an AMI is
/// built, the newest match launches, with the profile's CPU options and the
/// benchmark tuning flag in its user data.
#[tokio::test]
async fn a_profile_with_an_image_filter_launches_the_newest_match() {
    let h = Harness::new().await;
    h.profile(
        "kani",
        "max_instances = 5, image_id = NULL, image_filter = 'self/kani-runner-*', \
         threads_per_core = 1, benchmark_tuning = true",
    )
    .await;
    h.queue("kani", 0..1).await;
    let r = h.reconciler(100);
    for _ in 0..5 {
        h.reconcile(&r).await;
        h.clock.advance(Duration::from_secs(2));
    }
    assert_eq!(h.github.jit_calls(), 1, "backed off after the first miss");
    assert_eq!(h.cloud.live_count(None), 0);
    let ended: Vec<(String, String)> =
        sqlx::query_as("SELECT last_error_code, reason FROM runners ORDER BY created_at")
            .fetch_all(h.store.pool())
            .await
            .unwrap();
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(
        ended[0].0,
        spot_runners_domain::ports::IMAGE_FILTER_NO_MATCH
    );
    assert!(ended[0].1.contains("self/kani-runner-*"), "{ended:?}");

    // The AMI gets built (twice): after the backoff the newest one launches.
    let built = chrono::Utc::now();
    h.cloud.register_image(
        spot_runners_sim::cloud::FAKE_ACCOUNT,
        "kani-runner-2.334.0-1",
        built - chrono::Duration::days(1),
    );
    let newest = h.cloud.register_image(
        spot_runners_sim::cloud::FAKE_ACCOUNT,
        "kani-runner-2.334.0-2",
        built,
    );
    h.clock.advance(Duration::from_secs(30));
    h.reconcile(&r).await;
    assert_eq!(h.cloud.live_count(None), 1);
    let launched = &h.cloud.instances()[0];
    assert_eq!(launched.image_id, newest);
    assert_eq!(launched.request.threads_per_core, Some(1));
    assert!(launched
        .request
        .user_data
        .contains("\nBENCHMARK_TUNING='1'\n"));
}

/// The table accepts exactly one image source, and only filters of EC2's
/// `owner/name-pattern` shape.
#[tokio::test]
async fn the_table_wants_one_image_source() {
    let h = Harness::new().await;
    h.profile(
        "kani",
        "image_id = NULL, image_filter = 'amazon/al2023-ami-*'",
    )
    .await;
    for (set, constraint) in [
        ("image_id = 'ami-1'", "one_image_source"),
        ("image_filter = NULL", "one_image_source"),
        ("image_filter = 'al2023-ami-*'", "image_filter_format"),
        ("threads_per_core = 4", "threads_per_core_known"),
    ] {
        let err = sqlx::query(&format!(
            "UPDATE instance_profiles SET {set} WHERE name = 'kani'"
        ))
        .execute(h.store.pool())
        .await
        .unwrap_err();
        assert!(err.to_string().contains(constraint), "{set}: {err}");
    }
    // Rows that name an AMI, as every row before this column did, still work.
    h.profile("plain", "max_instances = 2").await;
    let profiles = h.profiles.get();
    let names: Vec<&str> = profiles.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["kani", "plain"]);
}
