//! A model of the reconciler's IO, in memory, for `spot-runners simulate`.
//!
//! `simulate` runs the production decisions — [`match_profile`],
//! [`plan_launches`], [`launch_candidates`] and [`plan_reaps`] — and the
//! production webhook parser, with this model in place of the Postgres
//! ledger and the provisioning tasks. It calls the fake GitHub and EC2
//! through the production traits, paced by token buckets of the size the
//! fakes enforce. What it models (DESIGN.md, "Webhook semantics" and "How it
//! works"):
//! - a ledger of jobs: duplicate GUIDs ignored, status only moves forward,
//!   a `completed` for an unknown job still recorded;
//! - a pass (on every delivery and every reconcile interval): terminate the
//!   instances of runners whose job completed; at most every 10 s a sweep:
//!   end runners whose instance is gone, learn which runners are online or
//!   busy (one runner list per scope) and which lost their registration,
//!   reap timeouts, check stale queued jobs against the jobs API by the
//!   production rule ([`StaleCutoffs`]), poll one repository a minute for
//!   queued jobs whose delivery was lost; then plan;
//! - provisioning: JIT config, then `RunInstances` walking the candidates.
//!
//! `serve --simulate` needs none of this: it runs the whole service.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use spot_runners_domain::job::ParsedWorkflowJob;
use spot_runners_domain::planner::{
    launch_candidates, plan_launches, Demand, QueuedJob, RunnerCount,
};
use spot_runners_domain::ports::{
    Cloud, CloudErrorKind, GitHub, GitHubError, JitConfig, JitRequest, LaunchRequest, RunnerScope,
};
use spot_runners_domain::ratelimit::TokenBucket;
use spot_runners_domain::reaper::{plan_reaps, RunnerAge};
use spot_runners_domain::stale::{self, StaleCutoffs};
use spot_runners_domain::userdata::{render, UserDataValues};
use spot_runners_domain::{
    match_profile, ControllerId, JobStatus, Market, Profile, RunnerName, RunnerState,
    WorkflowJobEvent,
};

use crate::cloud::REASON_SPOT_RECLAIMED;
use crate::payload::Delivery;
use crate::sim_clock::SimClock;

/// Sweeps (instances, runner list, timeouts, stale jobs) run at most this
/// often, as in the reconciler.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// One repository is asked for its queued jobs this often, in turn (lost
/// `queued` deliveries).
pub const POLL_EVERY: Duration = Duration::from_secs(60);
/// A job created this recently may still have its delivery in flight.
const POLL_GRACE_SECS: i64 = 60;
/// A runner launched this recently may be missing from a runner list.
const REGISTRATION_SETTLE_SECS: i64 = 60;

/// A job in the model's ledger.
#[derive(Clone, Debug)]
struct LedgerJob {
    repository: String,
    scope: RunnerScope,
    status: JobStatus,
    profile: Option<String>,
    /// When the ledger first heard of it.
    seen_at: DateTime<Utc>,
    checked_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug)]
struct ModelRunner {
    name: String,
    profile: String,
    scope: RunnerScope,
    state: RunnerState,
    github_id: Option<i64>,
    jit: Option<JitConfig>,
    /// The next launch candidate to try.
    candidate: usize,
    instance_id: Option<String>,
    launched_at: Option<DateTime<Utc>>,
    online_at: Option<DateTime<Utc>>,
    /// The job an `in_progress` named it for.
    job: Option<i64>,
}

/// What the modelled service did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ControllerStats {
    pub deliveries: u64,
    pub duplicates_ignored: u64,
    pub runners_requested: u64,
    pub spot_launches: u64,
    pub on_demand_launches: u64,
    /// `InsufficientInstanceCapacity` and friends, each moving the launch on
    /// to the next candidate.
    pub capacity_errors: u64,
    /// Runners that tried every candidate and gave up (the planner asks
    /// again if the demand is still there).
    pub launch_failures: u64,
    pub terminated_on_completion: u64,
    /// Runners whose instance was reclaimed before they took a job; the
    /// planner replaces them.
    pub relaunches: u64,
    /// Reaps by reason (`boot_timeout`, `idle_timeout`, `max_lifetime`).
    pub reaps: BTreeMap<String, u64>,
    pub stale_checks: u64,
    /// Stale queued jobs that GitHub said had started or finished.
    pub stale_healed: u64,
    /// Queued jobs found by polling GitHub that no delivery announced.
    pub discovered: u64,
    /// Runners ended because their GitHub registration was gone.
    pub registrations_gone: u64,
}

pub struct ControllerConfig {
    pub controller_id: ControllerId,
    pub max_instances: u32,
    pub seed: u64,
}

pub struct Controller {
    cloud: Arc<dyn Cloud>,
    github: Arc<dyn GitHub>,
    clock: SimClock,
    profiles: Vec<Profile>,
    controller_id: ControllerId,
    max_instances: u32,
    jobs: BTreeMap<i64, LedgerJob>,
    seen: BTreeSet<String>,
    /// The scope of each profile's latest job: where warm runners go.
    latest_scope: BTreeMap<String, RunnerScope>,
    /// Live runners by creation order.
    runners: BTreeMap<u64, ModelRunner>,
    by_name: BTreeMap<String, u64>,
    next_seq: u64,
    launch_bucket: TokenBucket,
    jit_bucket: TokenBucket,
    rng: StdRng,
    last_sweep: Option<Instant>,
    /// When GitHub was last polled for queued jobs, and which repository is next.
    last_poll: Option<Instant>,
    poll_turn: usize,
    stats: ControllerStats,
}

impl Controller {
    pub fn new(
        cloud: Arc<dyn Cloud>,
        github: Arc<dyn GitHub>,
        clock: SimClock,
        profiles: Vec<Profile>,
        config: ControllerConfig,
    ) -> Self {
        Self {
            launch_bucket: cloud.launch_limit().client_side(),
            jit_bucket: github.jit_config_limit(),
            cloud,
            github,
            clock,
            profiles,
            controller_id: config.controller_id,
            max_instances: config.max_instances,
            jobs: BTreeMap::new(),
            seen: BTreeSet::new(),
            latest_scope: BTreeMap::new(),
            runners: BTreeMap::new(),
            by_name: BTreeMap::new(),
            next_seq: 0,
            rng: StdRng::seed_from_u64(config.seed ^ 0x00c0_4e7e),
            last_sweep: None,
            last_poll: None,
            poll_turn: 0,
            stats: ControllerStats::default(),
        }
    }

    pub fn stats(&self) -> &ControllerStats {
        &self.stats
    }

    /// The ledger counts this job as queued demand for a profile.
    pub fn counts_as_demand(&self, job_id: i64) -> bool {
        self.jobs
            .get(&job_id)
            .is_some_and(|j| j.status == JobStatus::Queued && j.profile.is_some())
    }

    /// Runners requested, launching, booting, idle or busy.
    pub fn live_runners(&self) -> usize {
        self.runners.len()
    }

    // ------------------------------------------------------- webhooks --

    /// A delivery reaches the webhook endpoint.
    pub fn deliver(&mut self, d: &Delivery) {
        self.stats.deliveries += 1;
        if !self.seen.insert(d.guid.clone()) {
            self.stats.duplicates_ignored += 1;
            return;
        }
        let Ok(ParsedWorkflowJob::Event(ev)) = WorkflowJobEvent::parse(d.body.as_bytes()) else {
            return;
        };
        let now = self.clock.now_utc();
        let profile = match_profile(&self.profiles, &ev.labels, &ev.repository)
            .ok()
            .map(|p| p.name.to_string());
        let scope = match &ev.org {
            Some(org) => RunnerScope::Org(org.clone()),
            None => RunnerScope::Repo(ev.repository.clone()),
        };
        if let Some(p) = &profile {
            self.latest_scope.insert(p.clone(), scope.clone());
        }
        let job = self.jobs.entry(ev.job_id).or_insert_with(|| LedgerJob {
            repository: ev.repository.clone(),
            scope,
            status: ev.status,
            profile,
            seen_at: now,
            checked_at: None,
        });
        // Status only moves forward, whatever order deliveries arrive in.
        job.status = job.status.max(ev.status);
        if let Some(runner) = &ev.runner_name {
            match ev.status {
                JobStatus::InProgress => {
                    self.runner_busy(runner);
                    if let Some(r) = self.runner_mut(runner) {
                        r.job = Some(ev.job_id);
                    }
                }
                JobStatus::Completed => self.runner_done(runner),
                _ => {}
            }
        }
    }

    fn runner_busy(&mut self, name: &str) {
        if let Some(r) = self.runner_mut(name) {
            if r.state.is_available() {
                r.state = RunnerState::Busy;
            }
        }
    }

    fn runner_done(&mut self, name: &str) {
        if let Some(r) = self.runner_mut(name) {
            if !matches!(r.state, RunnerState::Done | RunnerState::Terminating) {
                r.state = RunnerState::Done;
            }
        }
    }

    fn runner_mut(&mut self, name: &str) -> Option<&mut ModelRunner> {
        let seq = self.by_name.get(name)?;
        self.runners.get_mut(seq)
    }

    fn end(&mut self, seq: u64, state: RunnerState) {
        if let Some(r) = self.runners.remove(&seq) {
            self.by_name.remove(&r.name);
            tracing::debug!(runner = %r.name, %state, "runner ended");
        }
    }

    // ----------------------------------------------------------- pass --

    /// One reconcile pass.
    pub async fn pass(&mut self) {
        self.terminate_finished().await;
        let now = self.clock.now();
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY)
        {
            self.last_sweep = Some(now);
            self.sweep_instances().await;
            let suspects = self.learn_online().await;
            self.reap().await;
            self.check_stale_jobs(suspects).await;
            self.poll_queued_jobs().await;
        }
        self.plan();
    }

    /// On `completed` the instance goes at once; it would power itself off,
    /// but that is the safety net.
    async fn terminate_finished(&mut self) {
        let done: Vec<(u64, Option<String>)> = self
            .runners
            .iter()
            .filter(|(_, r)| r.state == RunnerState::Done)
            .map(|(seq, r)| (*seq, r.instance_id.clone()))
            .collect();
        let ids: Vec<String> = done.iter().filter_map(|(_, id)| id.clone()).collect();
        if !ids.is_empty() && self.cloud.terminate(&ids).await.is_err() {
            return; // throttled or failing: next pass
        }
        for (seq, instance) in done {
            match instance {
                Some(_) => {
                    self.stats.terminated_on_completion += 1;
                    if let Some(r) = self.runners.get_mut(&seq) {
                        r.state = RunnerState::Terminating;
                    }
                }
                None => self.end(seq, RunnerState::Terminated),
            }
        }
    }

    /// Runners whose instance is gone: reclaimed, powered off, terminated.
    async fn sweep_instances(&mut self) {
        let with_instance = self.runners.values().any(|r| r.instance_id.is_some());
        if !with_instance {
            return;
        }
        let Ok(owned) = self.cloud.list_owned(self.controller_id.as_str()).await else {
            return;
        };
        let alive: BTreeMap<&str, (bool, Option<&str>)> = owned
            .iter()
            .map(|i| {
                (
                    i.id.as_str(),
                    (i.state.is_alive(), i.state_reason.as_deref()),
                )
            })
            .collect();
        let mut gone = Vec::new();
        for (seq, r) in &self.runners {
            let Some(id) = &r.instance_id else { continue };
            let (is_alive, reason) = alive.get(id.as_str()).copied().unwrap_or((false, None));
            if is_alive {
                continue;
            }
            let reclaimed = reason == Some(REASON_SPOT_RECLAIMED);
            gone.push((*seq, r.state, reclaimed));
        }
        for (seq, was, reclaimed) in gone {
            if reclaimed && matches!(was, RunnerState::Booting | RunnerState::Idle) {
                self.stats.relaunches += 1;
            }
            let state = if reclaimed {
                RunnerState::Interrupted
            } else {
                RunnerState::Terminated
            };
            self.end(seq, state);
        }
    }

    /// One runner list per scope: who is online, and who GitHub says is
    /// busy (taken, even if no `in_progress` said so; the flag lags, so
    /// "not busy" proves nothing). A runner missing from a complete list
    /// has lost its registration: a busy one probably finished (its job is
    /// returned, to be checked first), any other can never take a job and
    /// ends.
    async fn learn_online(&mut self) -> Vec<i64> {
        let mut suspects = Vec::new();
        let watched = |s: RunnerState| {
            matches!(
                s,
                RunnerState::Booting | RunnerState::Idle | RunnerState::Busy
            )
        };
        let scopes: BTreeSet<RunnerScope> = self
            .runners
            .values()
            .filter(|r| watched(r.state))
            .map(|r| r.scope.clone())
            .collect();
        let now = self.clock.now_utc();
        let settled = chrono::Duration::seconds(REGISTRATION_SETTLE_SECS);
        for scope in scopes {
            let Ok(listed) = self.github.list_runners(&scope).await else {
                continue;
            };
            let names: BTreeSet<String> =
                listed.iter().map(|g| g.name.to_ascii_lowercase()).collect();
            for g in listed {
                let Some(r) = self.runner_mut(&g.name) else {
                    continue;
                };
                if r.state == RunnerState::Booting && g.online {
                    r.state = RunnerState::Idle;
                    r.online_at = Some(now);
                }
                if g.busy && r.state.is_available() {
                    r.state = RunnerState::Busy;
                }
            }
            let gone: Vec<(u64, Option<i64>, Option<String>)> = self
                .runners
                .iter()
                .filter(|(_, r)| {
                    r.scope == scope
                        && watched(r.state)
                        && r.launched_at.is_some_and(|t| now - t >= settled)
                        && !names.contains(&r.name.to_ascii_lowercase())
                })
                .map(|(seq, r)| {
                    let job = if r.state == RunnerState::Busy {
                        r.job
                    } else {
                        None
                    };
                    (*seq, job, r.instance_id.clone())
                })
                .collect();
            let mut useless = Vec::new();
            for (seq, job, instance) in gone {
                match job {
                    Some(id) => suspects.push(id),
                    None => {
                        self.stats.registrations_gone += 1;
                        useless.extend(instance);
                        self.end(seq, RunnerState::Terminated);
                    }
                }
            }
            if !useless.is_empty() {
                // Failing, the instance is an orphan: it powers itself off.
                let _ = self.cloud.terminate(&useless).await;
            }
        }
        suspects
    }

    /// Jobs the ledger has as queued that [`StaleCutoffs`] says are due,
    /// after the suspects, [`stale::CHECKS_PER_SWEEP`] at most: a lost
    /// `in_progress` or `completed` heals here.
    async fn check_stale_jobs(&mut self, suspects: Vec<i64>) {
        let now = self.clock.now_utc();
        let cutoffs = StaleCutoffs::at(now);
        let recheck = chrono::Duration::seconds(stale::SUSPECT_RECHECK_SECS);
        let idle: BTreeSet<&str> = self
            .runners
            .values()
            .filter(|r| r.state == RunnerState::Idle)
            .map(|r| r.profile.as_str())
            .collect();
        let mut due: Vec<i64> = suspects
            .into_iter()
            .filter(|id| {
                self.jobs.get(id).is_some_and(|j| {
                    j.status != JobStatus::Completed
                        && j.checked_at.is_none_or(|t| now - t >= recheck)
                })
            })
            .collect();
        let mut queued: Vec<(Option<DateTime<Utc>>, DateTime<Utc>, i64)> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.status == JobStatus::Queued)
            .filter(|(_, j)| {
                let idle_runner = j.profile.as_deref().is_some_and(|p| idle.contains(p));
                cutoffs.due(j.seen_at, j.checked_at, idle_runner)
            })
            .map(|(id, j)| (j.checked_at, j.seen_at, *id))
            .collect();
        // Least recently checked first, as the store orders them.
        queued.sort();
        due.extend(queued.into_iter().map(|(_, _, id)| id));
        due.dedup();
        due.truncate(stale::CHECKS_PER_SWEEP);
        for id in due {
            let Some(repository) = self.jobs.get(&id).map(|j| j.repository.clone()) else {
                continue;
            };
            self.stats.stale_checks += 1;
            let answer = self.github.job(&repository, id).await;
            if let Some(j) = self.jobs.get_mut(&id) {
                j.checked_at = Some(now);
            }
            let Ok(report) = answer else { continue };
            let Ok(status) = JobStatus::parse(&report.status) else {
                continue;
            };
            let before = self.jobs.get(&id).map(|j| j.status);
            if before.is_some_and(|b| status > b) {
                self.stats.stale_healed += 1;
                if let Some(j) = self.jobs.get_mut(&id) {
                    j.status = j.status.max(status);
                }
                if let Some(runner) = &report.runner_name {
                    if status == JobStatus::InProgress {
                        self.runner_busy(runner);
                    } else {
                        self.runner_done(runner);
                    }
                }
            }
        }
    }

    /// GitHub never resends a lost `queued`: one repository a minute, in
    /// turn, is asked for its queued jobs, and those the ledger never saw
    /// are recorded.
    async fn poll_queued_jobs(&mut self) {
        let now = self.clock.now();
        if self
            .last_poll
            .is_some_and(|t| now.saturating_duration_since(t) < POLL_EVERY)
        {
            return;
        }
        self.last_poll = Some(now);
        let repositories: BTreeMap<String, RunnerScope> = self
            .jobs
            .values()
            .map(|j| (j.repository.clone(), j.scope.clone()))
            .collect();
        let Some((repository, scope)) = repositories
            .iter()
            .nth(self.poll_turn % repositories.len().max(1))
            .map(|(r, s)| (r.clone(), s.clone()))
        else {
            return;
        };
        self.poll_turn += 1;
        let Ok(jobs) = self.github.queued_jobs(&repository).await else {
            return;
        };
        let now_utc = self.clock.now_utc();
        let grace = chrono::Duration::seconds(POLL_GRACE_SECS);
        for j in jobs {
            if self.jobs.contains_key(&j.id) || j.created_at.is_some_and(|t| now_utc - t < grace) {
                continue;
            }
            let profile = match_profile(&self.profiles, &j.labels, &repository)
                .ok()
                .map(|p| p.name.to_string());
            self.stats.discovered += 1;
            self.jobs.insert(
                j.id,
                LedgerJob {
                    repository: repository.clone(),
                    scope: scope.clone(),
                    status: JobStatus::Queued,
                    profile,
                    seen_at: now_utc,
                    checked_at: None,
                },
            );
        }
    }

    fn demand(&self) -> BTreeMap<String, Demand> {
        let mut demand: BTreeMap<String, Demand> = BTreeMap::new();
        for j in self.jobs.values() {
            let Some(p) = &j.profile else { continue };
            if j.status == JobStatus::Queued {
                demand.entry(p.clone()).or_default().queued.push(QueuedJob {
                    since: j.seen_at,
                    scope: j.scope.clone(),
                });
            }
        }
        for (p, scope) in &self.latest_scope {
            demand.entry(p.clone()).or_default().warm_scope = Some(scope.clone());
        }
        for d in demand.values_mut() {
            d.queued.sort_by_key(|q| q.since);
        }
        demand
    }

    /// The production planner, on the model's ledger.
    fn plan(&mut self) {
        let counts: Vec<RunnerCount> = self
            .runners
            .values()
            .map(|r| RunnerCount {
                profile: r.profile.clone(),
                state: r.state,
                scope: Some(r.scope.clone()),
            })
            .collect();
        let launches = plan_launches(&self.profiles, &self.demand(), &counts, self.max_instances);
        for launch in launches {
            for new in launch.runners {
                let name =
                    RunnerName::generate(&self.controller_id, &launch.profile, &mut self.rng);
                let seq = self.next_seq;
                self.next_seq += 1;
                self.stats.runners_requested += 1;
                self.by_name.insert(name.to_string(), seq);
                self.runners.insert(
                    seq,
                    ModelRunner {
                        name: name.to_string(),
                        profile: launch.profile.to_string(),
                        scope: new.scope,
                        state: RunnerState::Requested,
                        github_id: None,
                        jit: None,
                        candidate: 0,
                        instance_id: None,
                        launched_at: None,
                        online_at: None,
                        job: None,
                    },
                );
            }
        }
    }

    /// The production reaper: boot, idle and lifetime timeouts.
    async fn reap(&mut self) {
        let ages: Vec<RunnerAge> = self
            .runners
            .values()
            .map(|r| RunnerAge {
                name: r.name.clone(),
                profile: r.profile.clone(),
                // GitHub's busy flag already moved runners to `busy`.
                state: r.state,
                launched_at: r.launched_at,
                online_at: r.online_at,
            })
            .collect();
        let reaps = plan_reaps(&self.profiles, &self.demand(), &ages, self.clock.now_utc());
        if reaps.is_empty() {
            return;
        }
        let ids: Vec<String> = reaps
            .iter()
            .filter_map(|reap| self.by_name.get(&reap.name))
            .filter_map(|seq| self.runners.get(seq)?.instance_id.clone())
            .collect();
        if !ids.is_empty() && self.cloud.terminate(&ids).await.is_err() {
            return;
        }
        for reap in reaps {
            let Some(&seq) = self.by_name.get(&reap.name) else {
                continue;
            };
            *self
                .stats
                .reaps
                .entry(reap.reason.as_str().to_owned())
                .or_default() += 1;
            tracing::debug!(runner = %reap.name, reason = reap.reason.as_str(), "reaped");
            self.forget_registration(seq).await;
            self.end(seq, reap.reason.final_state());
        }
    }

    async fn forget_registration(&mut self, seq: u64) {
        let Some(r) = self.runners.get(&seq) else {
            return;
        };
        if let Some(id) = r.github_id {
            let scope = r.scope.clone();
            let _ = self.github.delete_runner(&scope, id).await;
        }
    }

    // --------------------------------------------------- provisioning --

    /// Moves requested runners on, oldest first, as far as the rate limits
    /// allow right now; called on every tick.
    pub async fn provision(&mut self) {
        let waiting: Vec<u64> = self
            .runners
            .iter()
            .filter(|(_, r)| matches!(r.state, RunnerState::Requested | RunnerState::Registered))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in waiting {
            if !self.provision_one(seq).await {
                break;
            }
        }
    }

    /// `false` when a rate limit says to stop for now.
    async fn provision_one(&mut self, seq: u64) -> bool {
        let Some(runner) = self.runners.get(&seq).cloned() else {
            return true;
        };
        let Some(profile) = self
            .profiles
            .iter()
            .find(|p| p.name.as_str() == runner.profile)
            .cloned()
        else {
            self.end(seq, RunnerState::LaunchFailed);
            return true;
        };
        let now = self.clock.now();
        if runner.jit.is_none() {
            if let Err(go_on) = self.register(seq, &runner, &profile, now).await {
                return go_on;
            }
        }
        self.launch(seq, &profile, now).await
    }

    async fn register(
        &mut self,
        seq: u64,
        runner: &ModelRunner,
        profile: &Profile,
        now: Instant,
    ) -> Result<JitConfig, bool> {
        if self.jit_bucket.try_take(now).is_err() {
            return Err(false);
        }
        let request = JitRequest {
            name: runner.name.clone(),
            runner_group_id: profile.runner_group_id,
            labels: profile.runner_labels(),
        };
        match self
            .github
            .generate_jit_config(&runner.scope, &request)
            .await
        {
            Ok(jit) => {
                if let Some(r) = self.runners.get_mut(&seq) {
                    r.state = RunnerState::Registered;
                    r.github_id = Some(jit.runner_id);
                    r.jit = Some(jit.clone());
                }
                Ok(jit)
            }
            Err(GitHubError::NameTaken) => {
                if let Ok(listed) = self.github.list_runners(&runner.scope).await {
                    for g in listed.iter().filter(|g| g.name == runner.name) {
                        let _ = self.github.delete_runner(&runner.scope, g.id).await;
                    }
                }
                Err(true)
            }
            Err(GitHubError::RateLimited(_)) => Err(false),
            Err(GitHubError::Transient(_)) => Err(true),
            Err(GitHubError::NotFound | GitHubError::Refused(_)) => {
                self.end(seq, RunnerState::LaunchFailed);
                Err(true)
            }
        }
    }

    /// The JIT config waits in the parameter store (not modelled here: it
    /// costs no rate-limited call), so the launch needs only the profile.
    async fn launch(&mut self, seq: u64, profile: &Profile, now: Instant) -> bool {
        let Some(runner) = self.runners.get(&seq).cloned() else {
            return true;
        };
        let user_data = match render(&UserDataValues {
            controller_id: self.controller_id.as_str(),
            runner_name: &runner.name,
            profile,
        }) {
            Ok(u) => u,
            Err(_) => return self.give_up(seq).await,
        };
        let candidates = launch_candidates(profile);
        let mut candidate = runner.candidate;
        while let Some((instance_type, subnet_id, market)) = candidates.get(candidate).cloned() {
            if self.launch_bucket.try_take(now).is_err() {
                self.set_candidate(seq, candidate);
                return false;
            }
            let request = LaunchRequest {
                runner_name: runner.name.clone(),
                client_token: spot_runners_domain::names::client_token(
                    &runner.name,
                    u32::try_from(candidate).unwrap_or(u32::MAX),
                ),
                controller_id: self.controller_id.to_string(),
                profile: profile.name.to_string(),
                instance_type,
                subnet_id,
                image: profile.image.clone(),
                threads_per_core: profile.threads_per_core,
                security_group_ids: profile.security_group_ids.clone(),
                iam_instance_profile: profile.iam_instance_profile.clone(),
                market,
                root_volume_gb: profile.root_volume_gb,
                user_data: user_data.clone(),
            };
            match self.cloud.launch(&request).await {
                Ok(instance) => {
                    match market {
                        Market::Spot => self.stats.spot_launches += 1,
                        Market::OnDemand => self.stats.on_demand_launches += 1,
                    }
                    if let Some(r) = self.runners.get_mut(&seq) {
                        r.state = RunnerState::Booting;
                        r.instance_id = Some(instance.id);
                        r.launched_at = Some(self.clock.now_utc());
                        r.jit = None;
                    }
                    return true;
                }
                Err(e) => match e.kind {
                    CloudErrorKind::Capacity => {
                        self.stats.capacity_errors += 1;
                        candidate += 1;
                    }
                    // This candidate's token was used before: the next one
                    // has its own.
                    CloudErrorKind::TokenSpent => candidate += 1,
                    CloudErrorKind::Throttled => {
                        self.set_candidate(seq, candidate);
                        return false;
                    }
                    CloudErrorKind::Transient => {
                        self.set_candidate(seq, candidate);
                        return true;
                    }
                    CloudErrorKind::Invalid | CloudErrorKind::AccountSetup => {
                        return self.give_up(seq).await
                    }
                },
            }
        }
        self.give_up(seq).await
    }

    fn set_candidate(&mut self, seq: u64, candidate: usize) {
        if let Some(r) = self.runners.get_mut(&seq) {
            r.candidate = candidate;
        }
    }

    async fn give_up(&mut self, seq: u64) -> bool {
        self.stats.launch_failures += 1;
        self.forget_registration(seq).await;
        self.end(seq, RunnerState::LaunchFailed);
        true
    }
}
