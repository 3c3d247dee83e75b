//! The simulated world around the service: jobs that arrive on GitHub,
//! instances that boot on EC2, runners that come online and take jobs the
//! way GitHub hands them out, and the webhooks all of that produces.
//!
//! One world model, two drivers: `spot-runners serve --simulate` steps it in
//! real time and POSTs its deliveries, signed, to the running service;
//! `spot-runners simulate` steps it in virtual time against the production
//! reconciler. Either way the world owns handles
//! to the same [`FakeCloud`] and [`FakeGitHub`] the service calls through the
//! production traits, and reads tokio's clock, so paused-time tests move it.
//!
//! On each [`World::step`]:
//! - new jobs arrive: GitHub's jobs API reports them queued, and a `queued`
//!   delivery goes out;
//! - spot instances are reclaimed at the configured rate per instance type;
//! - instances shut themselves down when their boot script says so: shortly
//!   after their one job, or by the watchdog (no job within the idle limit,
//!   or the maximum lifetime), as `user-data/` does;
//! - an instance that is running brings its runner online (its name is the
//!   instance's `spot-runners:runner` tag, registered by the JIT config);
//! - an idle online runner takes the oldest queued job whose labels it has
//!   (case-insensitive, in its scope) — not necessarily the job it was
//!   launched for — and an `in_progress` delivery names it;
//! - a job that has run its duration completes (`completed`, success): GitHub
//!   removes the one-job runner and the instance powers off soon after;
//! - a job whose instance died under it fails: GitHub reports `completed`
//!   with `failure` after a delay;
//! - a workflow run (one job, or a matrix of several) whose latest attempt
//!   has every job completed sends `workflow_run` `completed`;
//! - a re-run the service asked the [`FakeGitHub`] for (which keeps
//!   GitHub's rules: only a completed run, a new job id in attempt + 1, at
//!   most 50 re-runs) queues its new job here, with a `queued` delivery.
//!
//! Deliveries pass through the [`FaultLayer`] (lost, duplicated, reordered,
//! late) before they are returned.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use spot_runners_domain::ports::{GitHubJob, JobReport, RunnerScope};
use spot_runners_domain::{JobStatus, Market};

use crate::arrivals::{Arrivals, JobSpec};
use crate::cloud::{LiveInstance, REASON_SPOT_RECLAIMED};
use crate::faults::{FaultCounts, FaultLayer, FaultRates};
use crate::payload::{self, Delivery, JobSnapshot};
use crate::scenario::Storm;
use crate::sim_clock::SimClock;
use crate::{FakeCloud, FakeGitHub};

/// How the world behaves.
#[derive(Clone, Debug)]
pub struct WorldConfig {
    /// The organization every job belongs to.
    pub org: String,
    /// From a job's end until its instance has powered itself off.
    pub runner_exit_delay: Duration,
    /// From an instance's death until GitHub reports its job failed.
    pub failure_report_delay: Duration,
    /// Spot reclaims per running instance-hour, by instance type; the key
    /// `default` covers the rest.
    pub interruptions_per_hour: BTreeMap<String, f64>,
    /// Pools reclaimed at a rate of their own for a while.
    pub storms: Vec<Storm>,
    pub faults: FaultRates,
    pub seed: u64,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            org: "acme".into(),
            runner_exit_delay: Duration::from_secs(15),
            failure_report_delay: Duration::from_secs(120),
            interruptions_per_hour: BTreeMap::new(),
            storms: Vec::new(),
            faults: FaultRates::none(),
            seed: 1,
        }
    }
}

/// A job as GitHub sees it.
#[derive(Clone, Debug)]
pub struct SimJob {
    pub id: i64,
    pub run_id: i64,
    pub run_attempt: i32,
    /// Its name on GitHub (a matrix job's carries its place).
    pub name: String,
    pub spec: JobSpec,
    /// The job of an earlier attempt this one re-runs.
    pub rerun_of: Option<i64>,
    /// Its instance was reclaimed by EC2 while it ran.
    pub interrupted: bool,
    /// Ends in `failure` of its own (a failing test), not `success`.
    pub fails_on_its_own: bool,
    pub queued_at: Instant,
    pub started_at: Option<Instant>,
    pub completed_at: Option<Instant>,
    /// `(name, id)` of the runner that took it.
    pub runner: Option<(String, i64)>,
    pub conclusion: Option<String>,
    /// When it finishes, once running.
    ends_at: Option<Instant>,
    /// When GitHub reports it failed, once its instance died under it.
    fails_at: Option<Instant>,
}

impl SimJob {
    /// Just queued on GitHub; nothing decided about it yet.
    fn queued(
        id: i64,
        run_id: i64,
        run_attempt: i32,
        name: String,
        spec: JobSpec,
        rerun_of: Option<i64>,
        now: Instant,
    ) -> Self {
        Self {
            id,
            run_id,
            run_attempt,
            name,
            spec,
            rerun_of,
            interrupted: false,
            fails_on_its_own: false,
            queued_at: now,
            started_at: None,
            completed_at: None,
            runner: None,
            conclusion: None,
            ends_at: None,
            fails_at: None,
        }
    }

    pub fn status(&self) -> JobStatus {
        if self.completed_at.is_some() {
            JobStatus::Completed
        } else if self.started_at.is_some() {
            JobStatus::InProgress
        } else {
            JobStatus::Queued
        }
    }

    /// Queued until a runner took it.
    pub fn wait(&self) -> Option<Duration> {
        self.started_at.map(|s| s - self.queued_at)
    }
}

/// Where an instance's runner stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunnerPhase {
    /// Booting, or its registration is gone and it cannot connect.
    Offline,
    Idle {
        since: Instant,
    },
    Busy {
        job: i64,
    },
    /// Its job is over; the instance is powering off.
    Done,
}

/// One instance's life, as the world followed it.
#[derive(Clone, Debug)]
pub struct InstanceLife {
    pub id: String,
    pub runner_name: String,
    pub profile: String,
    pub instance_type: String,
    pub subnet_id: Option<String>,
    pub market: Market,
    pub launched_at: Instant,
    /// When the world first saw it running.
    pub running_at: Option<Instant>,
    pub ended_at: Option<Instant>,
    pub phase: RunnerPhase,
    /// The runner's GitHub registration: id, labels (lower-case), scope.
    pub registration: Option<(i64, Vec<String>, RunnerScope)>,
    /// Time spent running a job.
    pub busy: Duration,
    busy_since: Option<Instant>,
    /// Reclaimed by EC2 (spot interruption).
    pub reclaimed: bool,
    /// The boot script's watchdog limits, measured from boot.
    idle_limit: Option<Duration>,
    lifetime: Option<Duration>,
    took_a_job: bool,
    shutdown_at: Option<Instant>,
}

impl InstanceLife {
    /// Running with no job: the money a runner costs while waiting.
    pub fn idle(&self, end: Instant) -> Duration {
        let Some(running) = self.running_at else {
            return Duration::ZERO;
        };
        let until = self.ended_at.unwrap_or(end);
        until
            .saturating_duration_since(running)
            .saturating_sub(self.busy)
    }

    /// Could take `job` now or once online: alive, not yet busy, fits.
    fn on_the_way_for(&self, job: &SimJob, org: &str) -> bool {
        self.ended_at.is_none()
            && matches!(self.phase, RunnerPhase::Offline | RunnerPhase::Idle { .. })
            && self
                .registration
                .as_ref()
                .is_some_and(|(_, labels, scope)| fits(labels, scope, job, org))
    }
}

/// GitHub's rule: every `runs-on` label is among the runner's labels
/// (case-insensitive), and the runner is registered where the job runs.
pub fn fits(runner_labels: &[String], scope: &RunnerScope, job: &SimJob, org: &str) -> bool {
    let in_scope = match scope {
        RunnerScope::Org(o) => o.eq_ignore_ascii_case(org),
        RunnerScope::Repo(r) => r.eq_ignore_ascii_case(&job.spec.repository),
    };
    in_scope
        && job
            .spec
            .labels
            .iter()
            .all(|l| runner_labels.iter().any(|r| r.eq_ignore_ascii_case(l)))
}

/// A workflow run as the world follows it.
#[derive(Clone, Debug)]
struct SimRun {
    repository: String,
    workflow: String,
    created_at: Instant,
    /// The latest attempt whose `completed` went out.
    announced: i32,
}

/// What happened in the world, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WorldStats {
    pub jobs: u64,
    pub spot_interruptions: u64,
    /// Jobs failed because their instance died under them.
    pub jobs_killed: u64,
    /// Instances whose watchdog powered them off with no job taken.
    pub watchdog_shutdowns: u64,
    pub workflow_runs: u64,
    /// Jobs queued by re-runs the service requested.
    pub rerun_jobs: u64,
}

pub struct World {
    cloud: FakeCloud,
    github: FakeGitHub,
    config: WorldConfig,
    clock: SimClock,
    arrivals: Arrivals,
    rng: StdRng,
    faults: FaultLayer,
    jobs: BTreeMap<i64, SimJob>,
    runs: BTreeMap<i64, SimRun>,
    /// The run of each matrix arrival, by its key.
    matrix_runs: BTreeMap<u64, i64>,
    /// Runs with a job completed since the last step.
    touched_runs: BTreeSet<i64>,
    /// Queued job ids; job ids grow with arrival, so this is GitHub's FIFO.
    queue: BTreeSet<i64>,
    next_job_id: i64,
    /// Submitted since the last step; their `queued` goes out with it.
    pending_queued: Vec<i64>,
    instances: Vec<InstanceLife>,
    by_id: BTreeMap<String, usize>,
    /// Indexes into `instances` of those not yet ended.
    live: Vec<usize>,
    last_step: Instant,
    stats: WorldStats,
}

impl World {
    pub fn new(
        cloud: FakeCloud,
        github: FakeGitHub,
        config: WorldConfig,
        clock: SimClock,
        arrivals: Arrivals,
    ) -> Self {
        let rng = StdRng::seed_from_u64(config.seed ^ 0x0077_6f72_6c64);
        let faults = FaultLayer::new(
            config.faults.clone(),
            StdRng::seed_from_u64(config.seed ^ 0x0066_6175_6c74),
        );
        Self {
            cloud,
            github,
            clock,
            arrivals,
            rng,
            faults,
            jobs: BTreeMap::new(),
            runs: BTreeMap::new(),
            matrix_runs: BTreeMap::new(),
            touched_runs: BTreeSet::new(),
            queue: BTreeSet::new(),
            next_job_id: 4_000_000_001,
            pending_queued: Vec::new(),
            instances: Vec::new(),
            by_id: BTreeMap::new(),
            live: Vec::new(),
            last_step: clock.now(),
            stats: WorldStats::default(),
            config,
        }
    }

    // ------------------------------------------------------ inspection --

    pub fn jobs(&self) -> impl Iterator<Item = &SimJob> {
        self.jobs.values()
    }

    pub fn job(&self, id: i64) -> Option<&SimJob> {
        self.jobs.get(&id)
    }

    /// Every instance the world has seen, in launch order.
    pub fn instances(&self) -> &[InstanceLife] {
        &self.instances
    }

    pub fn stats(&self) -> WorldStats {
        self.stats
    }

    pub fn fault_counts(&self) -> FaultCounts {
        self.faults.counts
    }

    pub fn clock(&self) -> SimClock {
        self.clock
    }

    pub fn org(&self) -> &str {
        &self.config.org
    }

    /// No job queued or running, and no delivery still in flight.
    pub fn is_quiet(&self) -> bool {
        self.queue.is_empty()
            && self.faults.in_flight() == 0
            && self.jobs.values().all(|j| j.completed_at.is_some())
    }

    pub fn queued(&self) -> impl Iterator<Item = &SimJob> {
        self.queue.iter().filter_map(|id| self.jobs.get(id))
    }

    /// A live instance whose runner could still take this job.
    pub fn runner_on_the_way(&self, job: &SimJob) -> bool {
        self.live
            .iter()
            .any(|&i| self.instances[i].on_the_way_for(job, &self.config.org))
    }

    /// No more jobs arrive from the job source.
    pub fn stop_arrivals(&mut self) {
        self.arrivals.stop();
    }

    // --------------------------------------------------------- controls --

    /// A job is queued on GitHub now (besides the job source's); returns
    /// its id. Its `queued` delivery goes out with the next step.
    pub fn submit(&mut self, spec: JobSpec) -> i64 {
        let id = self.next_job_id;
        self.next_job_id += 1;
        let now = self.clock.now();
        let run_id = match spec.matrix {
            Some((key, _)) => *self.matrix_runs.entry(key).or_insert(9_000_000_000 + id),
            None => 9_000_000_000 + id,
        };
        let name = spec.name();
        let run = self.runs.entry(run_id).or_insert_with(|| SimRun {
            repository: spec.repository.clone(),
            workflow: spec.kind.clone(),
            created_at: now,
            announced: 0,
        });
        let repository = run.repository.clone();
        if self.github.run(&repository, run_id).is_none() {
            self.stats.workflow_runs += 1;
        }
        let job = SimJob::queued(id, run_id, 1, name.clone(), spec, None, now);
        self.github.queue_job(
            &job.spec.repository,
            GitHubJob {
                id,
                run_id: job.run_id,
                run_attempt: 1,
                name: name.clone(),
                workflow_name: Some(job.spec.kind.clone()),
                labels: job.spec.labels.clone(),
                html_url: None,
                created_at: Some(self.clock.now_utc()),
            },
        );
        self.github.add_run_job(&repository, run_id, id, &name);
        tracing::info!(job_id = id, kind = %job.spec.kind, labels = ?job.spec.labels, "simulated job queued");
        self.jobs.insert(id, job);
        self.queue.insert(id);
        self.stats.jobs += 1;
        self.pending_queued.push(id);
        id
    }

    /// The job will end in `failure` of its own when its duration is up.
    pub fn fail_on_its_own(&mut self, job_id: i64) {
        if let Some(j) = self.jobs.get_mut(&job_id) {
            j.fails_on_its_own = true;
        }
    }

    /// EC2 reclaims the spot instance running this job now; `false` if no
    /// live spot instance runs it.
    pub fn reclaim_instance_of(&mut self, job_id: i64) -> bool {
        let Some(&i) = self
            .live
            .iter()
            .find(|&&i| self.instances[i].phase == RunnerPhase::Busy { job: job_id })
        else {
            return false;
        };
        let reclaimed = self.cloud.interrupt(&self.instances[i].id);
        self.stats.spot_interruptions += u64::from(reclaimed);
        reclaimed
    }

    /// Advances the world to tokio's now; returns what reaches the service.
    pub fn step(&mut self) -> Vec<Delivery> {
        let now = self.clock.now();
        let dt = now.saturating_duration_since(self.last_step);
        self.last_step = now;
        let mut out = Vec::new();
        for spec in self.arrivals.due(self.clock.elapsed()) {
            self.submit(spec);
        }
        self.queue_reruns(now);
        for id in std::mem::take(&mut self.pending_queued) {
            self.emit(&mut out, "queued", id);
        }
        self.interrupt_spot(dt);
        self.power_off_due(now);
        self.follow_instances(now);
        self.finish_jobs(now, &mut out);
        self.assign_jobs(now, &mut out);
        self.report_failures(now, &mut out);
        self.announce_completed_runs(now, &mut out);
        self.faults.apply(now, out)
    }

    /// The jobs GitHub created for re-runs the service asked for: queued,
    /// as the job they re-run (labels, and the same work to do).
    fn queue_reruns(&mut self, now: Instant) {
        for r in self.github.take_reruns() {
            let Some(old) = self.jobs.get(&r.of) else {
                tracing::warn!(job_id = r.of, "re-run of a job the world never had");
                continue;
            };
            let job = SimJob::queued(
                r.id,
                r.run_id,
                r.attempt,
                r.name.clone(),
                old.spec.clone(),
                Some(r.of),
                now,
            );
            tracing::info!(
                job_id = r.id,
                rerun_of = r.of,
                run_id = r.run_id,
                attempt = r.attempt,
                "simulated re-run job queued"
            );
            self.jobs.insert(r.id, job);
            self.queue.insert(r.id);
            self.stats.rerun_jobs += 1;
            self.stats.jobs += 1;
            self.pending_queued.push(r.id);
        }
    }

    /// `workflow_run` `completed` for every run whose latest attempt has
    /// just completed all its jobs.
    fn announce_completed_runs(&mut self, now: Instant, out: &mut Vec<Delivery>) {
        let mut due = Vec::new();
        for run_id in std::mem::take(&mut self.touched_runs) {
            let Some(run) = self.runs.get(&run_id) else {
                continue;
            };
            let Some(fake) = self.github.run(&run.repository, run_id) else {
                continue;
            };
            if fake.attempt <= run.announced {
                continue;
            }
            let jobs: Vec<&SimJob> = fake
                .jobs
                .iter()
                .filter_map(|(id, _, _)| self.jobs.get(id))
                .collect();
            if jobs.len() < fake.jobs.len() || jobs.iter().any(|j| j.completed_at.is_none()) {
                continue;
            }
            let failed = jobs
                .iter()
                .any(|j| j.conclusion.as_deref() != Some("success"));
            due.push((run_id, fake.attempt, failed));
        }
        for (run_id, attempt, failed) in due {
            let Some(run) = self.runs.get_mut(&run_id) else {
                continue;
            };
            run.announced = attempt;
            let body = payload::workflow_run_completed(&payload::RunSnapshot {
                id: run_id,
                run_attempt: attempt,
                workflow_name: &run.workflow,
                repository: &run.repository,
                org: &self.config.org,
                conclusion: if failed { "failure" } else { "success" },
                created_at: self.clock.utc(run.created_at),
                updated_at: self.clock.utc(now),
            });
            tracing::info!(run_id, attempt, failed, "simulated workflow run completed");
            out.push(Delivery {
                event: "workflow_run",
                guid: payload::guid(&mut self.rng),
                action: "completed",
                job_id: run_id,
                body,
            });
        }
    }

    // ------------------------------------------------------------ steps --

    fn interrupt_spot(&mut self, dt: Duration) {
        if dt.is_zero()
            || (self.config.interruptions_per_hour.is_empty() && self.config.storms.is_empty())
        {
            return;
        }
        let hours = dt.as_secs_f64() / 3600.0;
        let elapsed = self.clock.elapsed();
        for k in 0..self.live.len() {
            let inst = &self.instances[self.live[k]];
            if inst.market != Market::Spot || inst.running_at.is_none() {
                continue;
            }
            let storm = self.config.storms.iter().find(|s| {
                s.instance_type == inst.instance_type
                    && s.subnet_id
                        .as_ref()
                        .is_none_or(|n| Some(n) == inst.subnet_id.as_ref())
                    && elapsed >= s.at.0
                    && elapsed < s.at.0 + s.lasts.0
            });
            let rate = match storm {
                Some(s) => s.per_hour,
                None => rate_for(&self.config.interruptions_per_hour, &inst.instance_type),
            };
            if rate <= 0.0 {
                continue;
            }
            let p = 1.0 - (-rate * hours).exp();
            if self.rng.gen_bool(p.clamp(0.0, 1.0)) {
                let id = inst.id.clone();
                if self.cloud.interrupt(&id) {
                    self.stats.spot_interruptions += 1;
                    tracing::info!(instance = %id, "simulated EC2 reclaimed a spot instance");
                }
            }
        }
    }

    /// The boot script's doing: power off after the job, or by the watchdog.
    fn power_off_due(&mut self, now: Instant) {
        for &i in &self.live {
            let inst = &self.instances[i];
            let Some(running) = inst.running_at else {
                continue;
            };
            let up = now.saturating_duration_since(running);
            let after_job = inst.shutdown_at.is_some_and(|t| now >= t);
            let idle_too_long =
                !inst.took_a_job && inst.idle_limit.is_some_and(|limit| up >= limit);
            let too_old = inst.lifetime.is_some_and(|limit| up >= limit);
            if (after_job || idle_too_long || too_old)
                && self.cloud.shutdown_from_inside(&inst.id)
                && !inst.took_a_job
            {
                self.stats.watchdog_shutdowns += 1;
            }
        }
    }

    /// New instances, instances that are running, instances that are gone.
    fn follow_instances(&mut self, now: Instant) {
        let listed: Vec<LiveInstance> = self.cloud.live_instances();
        let alive: BTreeSet<&str> = listed.iter().map(|l| l.id.as_str()).collect();
        let gone: Vec<usize> = self
            .live
            .iter()
            .copied()
            .filter(|&i| !alive.contains(self.instances[i].id.as_str()))
            .collect();
        for i in gone {
            self.instance_ended(i, now);
        }
        self.live.retain(|&i| self.instances[i].ended_at.is_none());
        for l in &listed {
            let i = match self.by_id.get(&l.id) {
                Some(&i) => i,
                None => self.discover(l),
            };
            if l.running && self.instances[i].running_at.is_none() {
                self.instances[i].running_at = Some(now);
                self.bring_online(i, now);
            }
        }
    }

    fn discover(&mut self, l: &LiveInstance) -> usize {
        let user_data = self.cloud.user_data(&l.id).unwrap_or_default();
        let registration = self
            .github
            .runners()
            .into_iter()
            .find(|r| r.name.eq_ignore_ascii_case(&l.runner_name))
            .map(|r| {
                let labels = r.labels.iter().map(|s| s.to_lowercase()).collect();
                (r.id, labels, r.scope)
            });
        let i = self.instances.len();
        self.instances.push(InstanceLife {
            id: l.id.clone(),
            runner_name: l.runner_name.clone(),
            profile: l.profile.clone(),
            instance_type: l.instance_type.clone(),
            subnet_id: l.subnet_id.clone(),
            market: l.market,
            launched_at: l.launched_at,
            running_at: None,
            ended_at: None,
            phase: RunnerPhase::Offline,
            registration,
            busy: Duration::ZERO,
            busy_since: None,
            reclaimed: false,
            idle_limit: script_secs(&user_data, "IDLE_LIMIT_SECS"),
            lifetime: script_secs(&user_data, "MAX_LIFETIME_SECS"),
            took_a_job: false,
            shutdown_at: None,
        });
        self.by_id.insert(l.id.clone(), i);
        self.live.push(i);
        i
    }

    /// The runner connects with its JIT config; without a registration (it
    /// was deleted) it cannot, and the instance idles until its watchdog.
    fn bring_online(&mut self, i: usize, now: Instant) {
        let inst = &mut self.instances[i];
        if inst.registration.is_none() || !self.github.set_online(&inst.runner_name, true) {
            return;
        }
        inst.phase = RunnerPhase::Idle { since: now };
        tracing::info!(runner = %inst.runner_name, instance = %inst.id, "simulated runner is online");
    }

    fn instance_ended(&mut self, i: usize, now: Instant) {
        let reclaimed = self
            .cloud
            .instance(&self.instances[i].id)
            .and_then(|x| x.state_reason)
            .is_some_and(|r| r == REASON_SPOT_RECLAIMED);
        let inst = &mut self.instances[i];
        inst.ended_at = Some(now);
        inst.reclaimed = reclaimed;
        if let Some(since) = inst.busy_since.take() {
            inst.busy += now - since;
        }
        let phase = std::mem::replace(&mut inst.phase, RunnerPhase::Done);
        let name = inst.runner_name.clone();
        // An ephemeral runner whose machine is gone is removed by GitHub.
        self.github.deregister(&name);
        if let RunnerPhase::Busy { job } = phase {
            if let Some(j) = self.jobs.get_mut(&job) {
                if j.completed_at.is_none() {
                    j.interrupted = reclaimed;
                    j.fails_at = Some(now + self.config.failure_report_delay);
                    j.ends_at = None;
                    self.stats.jobs_killed += 1;
                    tracing::info!(job_id = job, runner = %name, "simulated job lost its instance; GitHub will fail it");
                }
            }
        }
    }

    fn finish_jobs(&mut self, now: Instant, out: &mut Vec<Delivery>) {
        let mut finished = Vec::new();
        for &i in &self.live {
            if let RunnerPhase::Busy { job } = self.instances[i].phase {
                if self.jobs[&job].ends_at.is_some_and(|t| t <= now) {
                    finished.push((i, job));
                }
            }
        }
        for (i, job_id) in finished {
            let inst = &mut self.instances[i];
            if let Some(since) = inst.busy_since.take() {
                inst.busy += now - since;
            }
            inst.phase = RunnerPhase::Done;
            inst.shutdown_at = Some(now + self.config.runner_exit_delay);
            let name = inst.runner_name.clone();
            self.github.set_busy(&name, false);
            self.github.deregister(&name);
            let job = self.jobs.get_mut(&job_id).expect_job();
            job.completed_at = Some(now);
            let conclusion = if job.fails_on_its_own {
                "failure"
            } else {
                "success"
            };
            job.conclusion = Some(conclusion.into());
            self.touched_runs.insert(job.run_id);
            tracing::info!(job_id, runner = %name, "simulated job completed");
            self.github
                .set_job(&job.spec.repository, job_id, report(job));
            self.emit(out, "completed", job_id);
        }
    }

    /// GitHub hands each queued job, oldest first, to the longest-idle
    /// online runner that fits it — whichever job that runner was launched
    /// for.
    fn assign_jobs(&mut self, now: Instant, out: &mut Vec<Delivery>) {
        let mut idle: Vec<(Instant, usize)> = self
            .live
            .iter()
            .filter_map(|&i| match self.instances[i].phase {
                RunnerPhase::Idle { since } => Some((since, i)),
                _ => None,
            })
            .collect();
        if idle.is_empty() || self.queue.is_empty() {
            return;
        }
        idle.sort();
        let queued: Vec<i64> = self.queue.iter().copied().collect();
        for job_id in queued {
            let job = &self.jobs[&job_id];
            let org = &self.config.org;
            let Some(k) = idle.iter().position(|&(_, i)| {
                self.instances[i]
                    .registration
                    .as_ref()
                    .is_some_and(|(_, labels, scope)| fits(labels, scope, job, org))
            }) else {
                continue;
            };
            let (_, i) = idle.remove(k);
            self.start_job(i, job_id, now);
            self.emit(out, "in_progress", job_id);
            if idle.is_empty() {
                break;
            }
        }
    }

    fn start_job(&mut self, i: usize, job_id: i64, now: Instant) {
        let inst = &mut self.instances[i];
        inst.phase = RunnerPhase::Busy { job: job_id };
        inst.took_a_job = true;
        inst.busy_since = Some(now);
        let runner_id = inst.registration.as_ref().map_or(0, |(id, _, _)| *id);
        let name = inst.runner_name.clone();
        self.github.set_busy(&name, true);
        self.queue.remove(&job_id);
        let job = self.jobs.get_mut(&job_id).expect_job();
        job.started_at = Some(now);
        job.ends_at = Some(now + job.spec.duration);
        job.runner = Some((name.clone(), runner_id));
        tracing::info!(job_id, runner = %name, kind = %job.spec.kind, "simulated runner took a job");
        self.github
            .set_job(&job.spec.repository, job_id, report(job));
    }

    fn report_failures(&mut self, now: Instant, out: &mut Vec<Delivery>) {
        let due: Vec<i64> = self
            .jobs
            .values()
            .filter(|j| j.completed_at.is_none() && j.fails_at.is_some_and(|t| t <= now))
            .map(|j| j.id)
            .collect();
        for job_id in due {
            let job = self.jobs.get_mut(&job_id).expect_job();
            job.completed_at = Some(now);
            job.conclusion = Some("failure".into());
            self.touched_runs.insert(job.run_id);
            job.fails_at = None;
            self.github
                .set_job(&job.spec.repository, job_id, report(job));
            self.emit(out, "completed", job_id);
        }
    }

    fn emit(&mut self, out: &mut Vec<Delivery>, action: &'static str, job_id: i64) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        let utc = |t: Instant| self.clock.utc(t);
        let snapshot = JobSnapshot {
            id: job.id,
            run_id: job.run_id,
            run_attempt: job.run_attempt,
            name: &job.name,
            workflow_name: &job.spec.kind,
            repository: &job.spec.repository,
            org: &self.config.org,
            labels: &job.spec.labels,
            status: action,
            conclusion: job.conclusion.as_deref(),
            runner: job.runner.as_ref().map(|(n, id)| (n.as_str(), *id)),
            created_at: utc(job.queued_at),
            started_at: job.started_at.map(utc),
            completed_at: job.completed_at.map(utc),
        };
        let body = payload::workflow_job(action, &snapshot);
        out.push(Delivery {
            event: "workflow_job",
            guid: payload::guid(&mut self.rng),
            action,
            job_id,
            body,
        });
    }
}

/// What GitHub's jobs API answers about a job.
fn report(job: &SimJob) -> JobReport {
    JobReport {
        status: job.status().as_str().to_owned(),
        conclusion: job.conclusion.clone(),
        runner_name: job.runner.as_ref().map(|(n, _)| n.clone()),
    }
}

/// The rate for an instance type, else the `default` entry, else none.
pub fn rate_for(rates: &BTreeMap<String, f64>, instance_type: &str) -> f64 {
    rates
        .get(instance_type)
        .or_else(|| rates.get("default"))
        .copied()
        .unwrap_or(0.0)
}

/// `NAME='123'` in the boot script, as seconds.
fn script_secs(script: &str, name: &str) -> Option<Duration> {
    let start = script.find(&format!("{name}='"))? + name.len() + 2;
    let rest = &script[start..];
    let value = &rest[..rest.find('\'')?];
    value.parse().ok().map(Duration::from_secs)
}

/// Job ids come from the world's own map; a missing one is a bug here.
trait ExpectJob<'a> {
    fn expect_job(self) -> &'a mut SimJob;
}

impl<'a> ExpectJob<'a> for Option<&'a mut SimJob> {
    #[allow(clippy::expect_used)]
    fn expect_job(self) -> &'a mut SimJob {
        self.expect("the world keeps every job it hands out")
    }
}
