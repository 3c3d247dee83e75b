//! The production reconciler on the in-memory ledger and the fakes: the
//! sweep rules that need GitHub's own semantics (a busy runner's delete is
//! refused; listings can skip a runner) and rows no other path ends.

use std::sync::Arc;
use std::time::Duration;

use spot_runners_domain::cost::SpendGate;
use spot_runners_domain::profile::{example_row, ProfileRow};
use spot_runners_domain::store::{IncomingDelivery, RunnerChange, Store};
use spot_runners_domain::{ControllerId, JobStatus, Profile, RunnerState, WorkflowJobEvent};
use spot_runners_reconciler::{Backends, NoMetrics, ProfileCache, Reconciler, SweepReport};
use spot_runners_sim::{FakeCloud, FakeGitHub, FakeParameterStore, ManualClock, MemoryStore};

struct Rig {
    store: MemoryStore,
    cloud: FakeCloud,
    github: FakeGitHub,
    clock: ManualClock,
    reconciler: Arc<Reconciler>,
}

fn profile(max_lifetime_secs: i32) -> Profile {
    Profile::try_from(ProfileRow {
        instance_types: vec!["c6i.4xlarge".into()],
        image_id: Some("ami-1".into()),
        subnet_ids: vec!["subnet-a".into()],
        max_lifetime_secs,
        ..example_row("kani", &["linux", "kani"])
    })
    .unwrap()
}

fn rig(max_lifetime_secs: i32) -> Rig {
    rig_with(max_lifetime_secs, SpendGate::unlimited())
}

fn rig_with(max_lifetime_secs: i32, gate: SpendGate) -> Rig {
    let clock = ManualClock::new();
    let store = MemoryStore::new(Arc::new(clock.clone()), 3);
    let cloud = FakeCloud::with_seed(3);
    let github = FakeGitHub::with_seed(3);
    let profiles = ProfileCache::default();
    profiles.set(vec![profile(max_lifetime_secs)]);
    let reconciler = Arc::new(
        Reconciler::new(
            Arc::new(store.clone()),
            Backends {
                cloud: Arc::new(cloud.clone()),
                github: Arc::new(github.clone()),
                parameters: Arc::new(FakeParameterStore::new()),
            },
            profiles,
            Arc::new(NoMetrics),
            ControllerId::default(),
            100,
        )
        .with_clock(Arc::new(clock.clone()))
        .with_spend_gate(gate)
        .with_seed(3),
    );
    Rig {
        store,
        cloud,
        github,
        clock,
        reconciler,
    }
}

fn event(id: i64, status: JobStatus, runner: Option<&str>) -> IncomingDelivery {
    IncomingDelivery {
        delivery_id: format!("{id}-{}", status.as_str()),
        profile: Ok("kani".into()),
        job: WorkflowJobEvent {
            job_id: id,
            run_id: id,
            run_attempt: 1,
            status,
            name: "proof".into(),
            workflow_name: None,
            labels: vec!["self-hosted".into(), "kani".into()],
            conclusion: (status == JobStatus::Completed).then(|| "success".into()),
            runner_id: None,
            runner_name: runner.map(str::to_owned),
            repository: "acme/proofs".into(),
            owner: "acme".into(),
            org: Some("acme".into()),
            installation_id: None,
            html_url: None,
            created_at: None,
            started_at: None,
            completed_at: None,
        },
    }
}

impl Rig {
    async fn deliver(&self, d: IncomingDelivery) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        self.store.record_deliveries(&[d], deadline).await.unwrap();
    }

    async fn sweep(&self) -> SweepReport {
        self.reconciler
            .sweep()
            .await
            .unwrap()
            .expect("the only replica leads")
    }

    /// One queued job, planned and provisioned: a booting runner.
    async fn booting_runner(&self) -> String {
        self.deliver(event(1, JobStatus::Queued, None)).await;
        assert_eq!(self.reconciler.pass().await.unwrap().requested, 1);
        while self.reconciler.provision_batch().await.unwrap() > 0 {}
        let runners = self
            .store
            .runners("spot-runners", Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(runners[0].state, RunnerState::Booting);
        runners[0].name.clone()
    }

    async fn state(&self, name: &str) -> RunnerState {
        self.store
            .runner_states("spot-runners", &[name.to_owned()])
            .await
            .unwrap()[name]
    }

    fn instance_alive(&self) -> bool {
        self.cloud.instances()[0].terminated_at.is_none()
    }
}

#[tokio::test]
async fn a_reap_deregisters_first_and_a_refusal_leaves_the_runner_alone() {
    let r = rig(3600);
    let name = r.booting_runner().await;
    // GitHub gave it a job; the ledger has not heard (the in_progress is late).
    r.github.set_online(&name, true);
    r.github.set_busy(&name, true);
    r.sweep().await;
    r.clock.advance(Duration::from_secs(3601));
    let refused = r.sweep().await;
    assert_eq!((refused.reaped, refused.reap_refused), (0, 1));
    assert!(
        r.instance_alive(),
        "GitHub refused the delete: the job goes on"
    );
    assert_eq!(r.state(&name).await, RunnerState::Busy);
    // The job is over: the delete is accepted, then the instance goes.
    r.github.set_busy(&name, false);
    let reaped = r.sweep().await;
    assert_eq!(reaped.reaped, 1);
    assert!(!r.instance_alive());
    assert!(r.github.runners().is_empty(), "registration deleted");
    assert_eq!(r.state(&name).await, RunnerState::Terminated);
}

#[tokio::test]
async fn a_runner_missing_from_one_listing_is_kept_and_from_two_a_sweep_apart_ended() {
    let r = rig(28_800);
    let name = r.booting_runner().await;
    r.github.set_online(&name, true);
    r.sweep().await;
    assert_eq!(r.state(&name).await, RunnerState::Idle);
    r.clock.advance(Duration::from_secs(120));
    // Paging skipped it (or it really left): one listing proves nothing.
    assert!(r.github.deregister(&name));
    assert_eq!(r.sweep().await.registrations_gone, 0);
    assert_eq!(r.state(&name).await, RunnerState::Idle);
    assert!(r.instance_alive());
    r.clock.advance(Duration::from_secs(10));
    assert_eq!(r.sweep().await.registrations_gone, 1);
    assert_eq!(r.state(&name).await, RunnerState::Terminated);
    assert!(!r.instance_alive());
}

#[tokio::test]
async fn a_runner_done_before_its_instance_was_recorded_is_ended() {
    let r = rig(28_800);
    r.deliver(event(1, JobStatus::Queued, None)).await;
    r.reconciler.pass().await.unwrap();
    let name = r
        .store
        .runners("spot-runners", Duration::ZERO)
        .await
        .unwrap()[0]
        .name
        .clone();
    // A provisioner died inside RunInstances; the instance took the job.
    r.store
        .claim_provisioning("spot-runners", "dead", Duration::from_secs(30), 10)
        .await
        .unwrap();
    r.store
        .update_runner(
            &name,
            "dead",
            RunnerChange::Launching {
                instance_type: "c6i.4xlarge".into(),
                subnet_id: None,
                market: "spot".into(),
            },
        )
        .await
        .unwrap();
    r.deliver(event(1, JobStatus::InProgress, Some(&name)))
        .await;
    r.reconciler.pass().await.unwrap();
    r.deliver(event(1, JobStatus::Completed, Some(&name))).await;
    r.reconciler.pass().await.unwrap();
    assert_eq!(
        r.state(&name).await,
        RunnerState::Done,
        "no instance id to terminate"
    );
    let swept = r.sweep().await;
    assert_eq!(swept.gone, 1);
    assert_eq!(
        r.state(&name).await,
        RunnerState::Terminated,
        "no longer holds a cap slot"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_github_listing_does_not_hold_up_planning() {
    let r = rig(28_800);
    r.deliver(event(1, JobStatus::Queued, None)).await;
    r.reconciler.pass().await.unwrap();
    // Every GitHub call now takes ten minutes: the sweep's runner listing
    // (the scope has a runner) hangs that long.
    r.github.set_latency(Duration::from_secs(600));
    let wake = Arc::new(tokio::sync::Notify::new());
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(Arc::clone(&r.reconciler).run(
        Arc::clone(&wake),
        Duration::from_secs(15),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    // A webhook arrives while the sweep waits on GitHub.
    let mut second = event(2, JobStatus::Queued, None);
    second.delivery_id = "second".into();
    r.deliver(second).await;
    wake.notify_one();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runners = r
        .store
        .runners("spot-runners", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        runners.len(),
        2,
        "planned within a second, not after the sweep"
    );
    stop.cancel();
    running.abort();
}

#[tokio::test]
async fn past_the_daily_spend_cap_nothing_new_is_registered_or_launched() {
    let gate = SpendGate::new(Some(100.0));
    gate.record_spend_today(120.0);
    let r = rig_with(28_800, gate.clone());
    r.deliver(event(1, JobStatus::Queued, None)).await;
    r.reconciler.pass().await.unwrap();
    assert_eq!(r.reconciler.provision_batch().await.unwrap(), 0);
    assert_eq!(r.cloud.live_count(None), 0, "no instance past the cap");
    let rows = r
        .store
        .runners("spot-runners", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].state, rows[0].github_runner_id),
        (RunnerState::Requested, None),
        "the planned runner waits, unregistered"
    );
    // A new UTC day: the spend worker opens the gate and the runner launches.
    gate.record_spend_today(0.0);
    assert_eq!(r.reconciler.provision_batch().await.unwrap(), 1);
    assert_eq!(r.cloud.live_count(None), 1);
}
