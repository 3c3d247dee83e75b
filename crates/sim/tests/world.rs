//! The simulated GitHub and EC2 as the service meets them: runners online
//! after boot, job stealing by label fit, webhooks naming the runner, the
//! jobs API telling the truth, jobs failing with their instance. Paused
//! tokio time throughout.

use std::time::Duration;

use serde_json::Value;
use spot_runners_domain::ports::{
    Cloud, GitHub, JitRequest, JobReport, LaunchRequest, RunnerScope,
};
use spot_runners_domain::{ImageSource, Market};
use spot_runners_sim::arrivals::{Arrivals, JobSpec};
use spot_runners_sim::cloud::REASON_SHUTDOWN_FROM_INSIDE;
use spot_runners_sim::payload::Delivery;
use spot_runners_sim::sim_clock::SimClock;
use spot_runners_sim::world::{World, WorldConfig};
use spot_runners_sim::{FakeCloud, FakeGitHub};

const BOOT: Duration = Duration::from_secs(30);

struct Sim {
    cloud: FakeCloud,
    github: FakeGitHub,
    world: World,
}

fn org() -> RunnerScope {
    RunnerScope::Org("acme".into())
}

fn sim(config: WorldConfig) -> Sim {
    let cloud = FakeCloud::with_seed(1);
    cloud.set_boot_time(BOOT);
    let github = FakeGitHub::with_seed(1);
    let world = World::new(
        cloud.clone(),
        github.clone(),
        config,
        SimClock::starting_at(SimClock::virtual_epoch()),
        Arrivals::none(),
    );
    Sim {
        cloud,
        github,
        world,
    }
}

fn job(labels: &[&str], secs: u64) -> JobSpec {
    JobSpec {
        kind: "proof".into(),
        repository: "acme/proofs".into(),
        labels: labels.iter().map(|s| (*s).to_owned()).collect(),
        duration: Duration::from_secs(secs),
        matrix: None,
    }
}

impl Sim {
    /// What the service does for a runner: JIT config, then an instance
    /// tagged with the runner's name.
    async fn launch_runner(&self, name: &str, labels: &[&str]) -> String {
        let mut all = vec!["self-hosted".to_owned()];
        all.extend(labels.iter().map(|s| (*s).to_owned()));
        self.github
            .generate_jit_config(
                &org(),
                &JitRequest {
                    name: name.into(),
                    runner_group_id: 1,
                    labels: all,
                },
            )
            .await
            .unwrap();
        let instance = self
            .cloud
            .launch(&LaunchRequest {
                runner_name: name.into(),
                client_token: name.into(),
                controller_id: "spot-runners".into(),
                profile: "kani".into(),
                instance_type: "c6i.4xlarge".into(),
                subnet_id: None,
                image: ImageSource::Id("ami-1".into()),
                threads_per_core: None,
                security_group_ids: vec![],
                iam_instance_profile: None,
                market: Market::Spot,
                root_volume_gb: 64,
                user_data: "IDLE_LIMIT_SECS='900'\nMAX_LIFETIME_SECS='28800'\n".into(),
            })
            .await
            .unwrap();
        instance.id
    }

    /// Steps once a second for `secs` seconds, collecting deliveries.
    async fn run(&mut self, secs: u64) -> Vec<Delivery> {
        let mut out = self.world.step();
        for _ in 0..secs {
            tokio::time::advance(Duration::from_secs(1)).await;
            out.extend(self.world.step());
        }
        out
    }

    async fn report(&self, job_id: i64) -> JobReport {
        self.github.job("acme/proofs", job_id).await.unwrap()
    }
}

fn body(d: &Delivery) -> Value {
    serde_json::from_str(&d.body).unwrap()
}

fn of(deliveries: &[Delivery], action: &str, job_id: i64) -> Vec<Value> {
    deliveries
        .iter()
        .filter(|d| d.action == action && d.job_id == job_id)
        .map(body)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_runner_takes_the_oldest_job_it_fits_not_the_one_it_was_launched_for() {
    let mut s = sim(WorldConfig::default());
    // Oldest first: a bench job no kani runner can take, then B, then A.
    let bench = s.world.submit(job(&["self-hosted", "bench"], 60));
    let b = s.world.submit(job(&["self-hosted", "linux", "kani"], 60));
    let a = s.world.submit(job(&["self-hosted", "kani"], 60));
    let queued = s.run(0).await;
    assert_eq!(queued.iter().filter(|d| d.action == "queued").count(), 3);

    // The runner is launched "for" A.
    s.launch_runner("spot-runners-kani-aaaaaaaa", &["linux", "x64", "kani"])
        .await;
    let out = s.run(BOOT.as_secs()).await;

    let started = of(&out, "in_progress", b);
    assert_eq!(started.len(), 1, "B, the oldest fitting job, is taken");
    assert_eq!(
        started[0]["workflow_job"]["runner_name"],
        "spot-runners-kani-aaaaaaaa"
    );
    assert!(started[0]["workflow_job"]["runner_id"].as_i64().unwrap() > 0);
    assert!(of(&out, "in_progress", a).is_empty());
    assert!(of(&out, "in_progress", bench).is_empty(), "labels must fit");
    assert_eq!(s.report(a).await.status, "queued");
    assert_eq!(s.report(bench).await.status, "queued");
}

#[tokio::test(start_paused = true)]
async fn labels_fit_case_insensitively_and_a_runner_never_takes_a_job_it_lacks_labels_for() {
    let mut s = sim(WorldConfig::default());
    let shouty = s.world.submit(job(&["Self-Hosted", "KANI", "Linux"], 60));
    let gpu = s.world.submit(job(&["self-hosted", "kani", "gpu"], 60));
    s.launch_runner("spot-runners-kani-aaaaaaaa", &["linux", "x64", "kani"])
        .await;
    s.launch_runner("spot-runners-kani-bbbbbbbb", &["linux", "x64", "kani"])
        .await;
    let out = s.run(600).await;
    assert_eq!(of(&out, "in_progress", shouty).len(), 1);
    assert!(of(&out, "in_progress", gpu).is_empty());
    // The second runner is still idle, waiting for a job it fits.
    let idle: Vec<_> = s
        .github
        .runners()
        .into_iter()
        .filter(|r| r.online && !r.busy)
        .collect();
    assert_eq!(idle.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_runner_comes_online_only_once_its_instance_runs() {
    let mut s = sim(WorldConfig::default());
    let j = s.world.submit(job(&["self-hosted", "kani"], 60));
    s.launch_runner("spot-runners-kani-aaaaaaaa", &["kani"])
        .await;
    let early = s.run(BOOT.as_secs() - 1).await;
    assert!(of(&early, "in_progress", j).is_empty());
    let listed = s.github.list_runners(&org()).await.unwrap();
    assert!(!listed[0].online, "still booting");

    let out = s.run(1).await;
    assert_eq!(of(&out, "in_progress", j).len(), 1);
    let listed = s.github.list_runners(&org()).await.unwrap();
    assert!(listed[0].online && listed[0].busy);
}

#[tokio::test(start_paused = true)]
async fn a_job_runs_its_duration_then_completes_and_the_instance_powers_off() {
    let mut s = sim(WorldConfig {
        runner_exit_delay: Duration::from_secs(15),
        ..WorldConfig::default()
    });
    let j = s.world.submit(job(&["self-hosted", "kani"], 120));
    let before = s.report(j).await;
    assert_eq!(before.status, "queued");
    assert_eq!(before.runner_name, None);

    let instance = s
        .launch_runner("spot-runners-kani-aaaaaaaa", &["kani"])
        .await;
    let out = s.run(BOOT.as_secs()).await;
    assert_eq!(of(&out, "in_progress", j).len(), 1);
    let during = s.report(j).await;
    assert_eq!(during.status, "in_progress");
    assert_eq!(
        during.runner_name.as_deref(),
        Some("spot-runners-kani-aaaaaaaa")
    );

    let out = s.run(119).await;
    assert!(
        of(&out, "completed", j).is_empty(),
        "not before its duration"
    );
    let out = s.run(1).await;
    let done = of(&out, "completed", j);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["workflow_job"]["conclusion"], "success");
    assert_eq!(
        done[0]["workflow_job"]["runner_name"],
        "spot-runners-kani-aaaaaaaa"
    );
    let after = s.report(j).await;
    assert_eq!(after.status, "completed");
    assert_eq!(after.conclusion.as_deref(), Some("success"));
    // A JIT runner leaves GitHub after its one job.
    assert!(s.github.runners().is_empty());

    // Nobody terminates it: the instance shuts itself down.
    s.run(14).await;
    assert!(s.cloud.instance(&instance).unwrap().state.is_alive());
    s.run(1).await;
    let gone = s.cloud.instance(&instance).unwrap();
    assert!(!gone.state.is_alive());
    assert_eq!(
        gone.state_reason.as_deref(),
        Some(REASON_SHUTDOWN_FROM_INSIDE)
    );
    let life = &s.world.instances()[0];
    assert_eq!(life.busy, Duration::from_secs(120));
}

#[tokio::test(start_paused = true)]
async fn a_job_whose_instance_dies_fails_after_a_delay() {
    let mut s = sim(WorldConfig {
        failure_report_delay: Duration::from_secs(90),
        ..WorldConfig::default()
    });
    let j = s.world.submit(job(&["self-hosted", "kani"], 3600));
    let instance = s
        .launch_runner("spot-runners-kani-aaaaaaaa", &["kani"])
        .await;
    s.run(BOOT.as_secs() + 10).await;
    assert!(s.cloud.interrupt(&instance));

    let out = s.run(89).await;
    assert!(of(&out, "completed", j).is_empty());
    assert_eq!(s.report(j).await.status, "in_progress");
    let out = s.run(1).await;
    let failed = of(&out, "completed", j);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["workflow_job"]["conclusion"], "failure");
    let report = s.report(j).await;
    assert_eq!(report.conclusion.as_deref(), Some("failure"));
    assert_eq!(s.world.stats().jobs_killed, 1);
    assert!(s.world.instances()[0].reclaimed);
}

#[tokio::test(start_paused = true)]
async fn an_idle_instance_is_powered_off_by_its_watchdog() {
    let mut s = sim(WorldConfig::default());
    let instance = s
        .launch_runner("spot-runners-kani-aaaaaaaa", &["kani"])
        .await;
    // Running after 30 s, idle limit 900 s from boot.
    s.run(BOOT.as_secs() + 899).await;
    assert!(s.cloud.instance(&instance).unwrap().state.is_alive());
    s.run(1).await;
    assert!(!s.cloud.instance(&instance).unwrap().state.is_alive());
    assert_eq!(s.world.stats().watchdog_shutdowns, 1);
    assert_eq!(
        s.world.instances()[0].idle(tokio::time::Instant::now().into_std()),
        Duration::from_secs(900)
    );
}

#[tokio::test(start_paused = true)]
async fn spot_instances_are_reclaimed_at_their_rate() {
    let mut s = sim(WorldConfig {
        interruptions_per_hour: [("c6i.4xlarge".to_owned(), 8.0)].into(),
        ..WorldConfig::default()
    });
    for i in 0..20 {
        s.launch_runner(&format!("spot-runners-kani-{i:08}"), &["kani"])
            .await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    s.run(3600).await;
    // 8 an hour each, over the 15 minutes their watchdog lets them idle:
    // 1 - e^-2, some 86% of them.
    let n = s.world.stats().spot_interruptions;
    assert!((12..=20).contains(&n), "{n}");
    let reclaimed = s.world.instances().iter().filter(|i| i.reclaimed).count();
    assert_eq!(reclaimed as u64, n);
}
