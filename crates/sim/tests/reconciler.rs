//! The production reconciler on the in-memory ledger and the fakes: the
//! sweep rules that need GitHub's own semantics (a busy runner's delete is
//! refused; listings can skip a runner) and rows no other path ends.

use std::sync::Arc;
use std::time::Duration;

use spot_runners_domain::api_budget::RateLimit;
use spot_runners_domain::clock::Clock;
use spot_runners_domain::cost::SpendGate;
use spot_runners_domain::ports::{GitHubJob, WebhookSource};
use spot_runners_domain::profile::{example_row, ProfileRow};
use spot_runners_domain::redelivery::{Healing, HEALS_FOR};
use spot_runners_domain::store::{IncomingDelivery, RunnerChange, Store};
use spot_runners_domain::{ControllerId, JobStatus, Profile, RunnerState, WorkflowJobEvent};
use spot_runners_reconciler::{
    Backends, NoMetrics, ProfileCache, Reconciler, Redeliverer, SweepReport,
};
use spot_runners_sim::github::GitHubCall;
use spot_runners_sim::{FakeCloud, FakeGitHub, FakeParameterStore, ManualClock, MemoryStore};

struct Rig {
    store: MemoryStore,
    cloud: FakeCloud,
    github: FakeGitHub,
    clock: ManualClock,
    reconciler: Arc<Reconciler>,
    /// Shared with any [`Redeliverer`] a test runs.
    healing: Arc<Healing>,
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
    let healing = Arc::new(Healing::default());
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
        .with_healing(Arc::clone(&healing))
        .with_seed(3),
    );
    Rig {
        store,
        cloud,
        github,
        clock,
        reconciler,
        healing,
    }
}

fn event(id: i64, status: JobStatus, runner: Option<&str>) -> IncomingDelivery {
    event_in("acme/proofs", id, status, runner)
}

fn event_in(
    repository: &str,
    id: i64,
    status: JobStatus,
    runner: Option<&str>,
) -> IncomingDelivery {
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
            repository: repository.into(),
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

/// GitHub's calls of one method since `from` (an index into `calls()`).
fn calls_of(github: &FakeGitHub, method: &str, from: usize) -> Vec<GitHubCall> {
    github.calls()[from..]
        .iter()
        .filter(|c| c.method() == method)
        .cloned()
        .collect()
}

fn polled_repositories(github: &FakeGitHub, from: usize) -> Vec<String> {
    calls_of(github, "queued_jobs", from)
        .into_iter()
        .filter_map(|c| match c {
            GitHubCall::QueuedJobs { repository, .. } => Some(repository),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_tight_github_budget_holds_back_sweeps_but_never_registrations_or_terminations() {
    let r = rig(28_800);
    let at = |secs: i64| r.clock.now() + chrono::Duration::seconds(secs);
    // 400 of 5,000 left for the next half hour: below a fifth.
    r.github.set_rate_limit(Some(RateLimit {
        remaining: 400,
        limit: 5000,
        reset_at: at(1800),
    }));
    let name = r.booting_runner().await;
    assert_eq!(r.github.jit_calls(), 1, "the JIT registration went ahead");
    let start = r.github.calls().len();
    for _ in 0..12 {
        r.sweep().await;
        r.clock.advance(Duration::from_secs(10));
    }
    assert_eq!(
        calls_of(&r.github, "list_runners", start).len(),
        2,
        "runners listed once a minute"
    );
    assert!(
        polled_repositories(&r.github, start).is_empty(),
        "the poll for lost jobs waits for the budget"
    );
    // The job runs and completes: its instance is terminated at once.
    r.deliver(event(1, JobStatus::InProgress, Some(&name)))
        .await;
    r.deliver(event(1, JobStatus::Completed, Some(&name))).await;
    r.reconciler.pass().await.unwrap();
    assert!(!r.instance_alive(), "terminations never wait");
    // The window resets: the next sweep lists and the poll is due again.
    r.clock.advance(Duration::from_secs(1800));
    let start = r.github.calls().len();
    r.sweep().await;
    assert_eq!(calls_of(&r.github, "list_runners", start).len(), 1);
    assert_eq!(polled_repositories(&r.github, start), ["acme/proofs"]);
}

#[tokio::test]
async fn polls_go_first_where_a_job_ran_unannounced_and_idle_repositories_wait_half_an_hour() {
    let r = rig(28_800);
    r.deliver(event_in("acme/a", 1, JobStatus::Completed, None))
        .await;
    r.deliver(event_in("acme/b", 2, JobStatus::Completed, None))
        .await;
    // Both quiet: each is polled once (not polled since this start), a
    // minute apart, and then not for half an hour.
    r.clock.advance(Duration::from_secs(20 * 60));
    let start = r.github.calls().len();
    for _ in 0..29 {
        r.sweep().await;
        r.clock.advance(Duration::from_secs(60));
    }
    let mut first = polled_repositories(&r.github, start);
    first.sort();
    assert_eq!(first, ["acme/a", "acme/b"]);
    // Half the budget gone: only suspects are polled now. A job of acme/a
    // arrives (activity, nothing suspect); a job of acme/b ran on a runner
    // with no `queued` ever seen: its sibling may be waiting unseen too,
    // and GitHub lists it.
    r.github.set_rate_limit(Some(RateLimit {
        remaining: 2000,
        limit: 5000,
        reset_at: r.clock.now() + chrono::Duration::minutes(30),
    }));
    r.deliver(event_in("acme/a", 5, JobStatus::Queued, None))
        .await;
    r.github.queue_job(
        "acme/b",
        GitHubJob {
            id: 3,
            run_id: 2,
            run_attempt: 1,
            name: "proof".into(),
            workflow_name: None,
            labels: vec!["self-hosted".into(), "kani".into()],
            html_url: None,
            created_at: Some(r.clock.now() - chrono::Duration::minutes(5)),
        },
    );
    r.deliver(event_in(
        "acme/b",
        4,
        JobStatus::InProgress,
        Some("someone-else"),
    ))
    .await;
    let start = r.github.calls().len();
    let swept = r.sweep().await;
    assert_eq!(polled_repositories(&r.github, start), ["acme/b"]);
    assert_eq!(swept.discovered, 1);
    assert!(
        r.store.job(3).await.unwrap().is_some(),
        "recorded as if delivered"
    );
}

#[tokio::test]
async fn a_busy_repository_is_polled_every_minute_only_while_redelivery_is_not_healing() {
    let r = rig(28_800);
    let minute = Duration::from_secs(60);
    // Sweeps once a minute for `minutes`; the repositories they polled.
    let sweep_for = |minutes: u32| {
        let r = &r;
        async move {
            let start = r.github.calls().len();
            for _ in 0..minutes {
                r.sweep().await;
                r.clock.advance(minute);
            }
            polled_repositories(&r.github, start)
        }
    };
    r.deliver(event_in("acme/busy", 1, JobStatus::Queued, None))
        .await;
    // No redelivery: a failed `queued` has no trace but the repository's
    // own listing, so a busy repository is polled every minute.
    assert_eq!(sweep_for(3).await.len(), 3);

    // The redelivery scan reads the hook's delivery log: what failed is
    // redelivered from there, and the busy repository waits for the quiet
    // period like any other.
    let redeliverer = Redeliverer::new(
        Arc::new(r.store.clone()),
        Arc::new(r.github.clone()),
        WebhookSource::App,
        Arc::new(r.clock.clone()),
        Arc::new(NoMetrics),
        "spot-runners".into(),
        Arc::clone(&r.healing),
    );
    let mut last_scan = r.clock.now();
    for _ in 0..2 {
        last_scan = r.clock.now();
        redeliverer.scan_if_leader().await.unwrap().expect("leads");
        assert_eq!(sweep_for(5).await, Vec::<String>::new());
    }
    // A job that ran unannounced is no failed delivery: polled at once.
    r.deliver(event_in("acme/busy", 2, JobStatus::InProgress, Some("r-x")))
        .await;
    assert_eq!(sweep_for(1).await, ["acme/busy"]);

    // The scans stop (no permission, GitHub failing): once the last one is
    // older than HEALS_FOR, every minute again.
    let start = r.github.calls().len();
    while r.healing.heals(r.clock.now()) {
        r.sweep().await;
        r.clock.advance(minute);
    }
    assert!(polled_repositories(&r.github, start).is_empty());
    assert!(r.clock.now() - last_scan < HEALS_FOR + chrono::Duration::minutes(1));
    assert_eq!(sweep_for(2).await, ["acme/busy", "acme/busy"]);
}
