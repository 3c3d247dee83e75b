//! The reconciler: compares what is wanted (queued demand per profile, plus
//! warm pools) with what exists (runners) and acts on the difference.
//!
//! A *pass* is quick and touches only the database: re-match jobs that
//! arrived before their profile existed, plan, write `requested` rows, and
//! refresh gauges. *Provisioning* — the slow part, paced by EC2's and
//! GitHub's rate limits — runs beside it, claiming `requested` rows with a
//! lease, so a crash anywhere leaves rows the next claim resumes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use spot_runners_domain::backoff::{self, Backoffs};
use spot_runners_domain::clock::{Clock, SystemClock};
use spot_runners_domain::names::client_token;
use spot_runners_domain::planner::plan_launches;
use spot_runners_domain::ports::{
    Cloud, CloudError, CloudErrorKind, GitHub, GitHubError, GitHubJob, GitHubRunner, Instance,
    JitConfig, JitRequest, JobReport, LaunchRequest, ParameterStore, RunnerScope,
};
use spot_runners_domain::ratelimit::TokenBucket;
use spot_runners_domain::reaper::{plan_reaps, RunnerAge};
use spot_runners_domain::scopes::{fill_warm_scopes, KnownScopes};
use spot_runners_domain::stale::{self, StaleCutoffs};
use spot_runners_domain::userdata::{render, UserDataValues};
use spot_runners_domain::{
    ControllerId, JobStatus, Profile, RunnerName, RunnerState, WorkflowJobEvent,
};
use spot_runners_store::{
    IncomingDelivery, JobCheck, RunnerChange, RunnerRecord, StaleJob, Store, StoreError,
    DEFAULT_LEASE,
};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::profiles::ProfileCache;

mod cost_tags;
mod jit_config;

/// Rows one provisioner claims at a time; each waits its turn at the
/// token bucket, so this bounds in-flight calls, not throughput.
const CLAIM_BATCH: i64 = 32;
/// Retries of one call on transient errors.
const MAX_RETRIES: u32 = 4;
/// Retries of one launch candidate on `RequestLimitExceeded`. EC2's bucket
/// is per account: another replica or tool spending it is no reason to give
/// up, only to wait longer.
const MAX_THROTTLED_RETRIES: u32 = 12;
/// Rate-limit waits longer than this are not slept through: the row is
/// released and a later claim tries again.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// A runner postponed (rate limits, GitHub trouble) is claimable again after this.
const RETRY_LATER: Duration = Duration::from_secs(2);
/// An instance missing from EC2's listing this long after its launch is gone.
const GONE_AFTER_SECS: i64 = 300;
/// Sweeps (GitHub's runner list, orphans, timeouts, stale jobs) run at most
/// this often, however often webhooks wake the reconciler.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// The scopes of runners that ended this recently are still listed, so a
/// leftover registration of theirs is found.
const ORPHAN_MEMORY: Duration = Duration::from_secs(24 * 3600);
/// A `terminating` runner whose instance still runs this long after is
/// terminated again (a terminate lost in a crash or an EC2 hiccup).
const TERMINATE_RETRY_AFTER_SECS: i64 = 60;
/// A busy runner's job, once checked, is checked again no sooner than this.
const RECHECK_AFTER_SECS: i64 = stale::SUSPECT_RECHECK_SECS;
/// A runner launched this recently may be missing from a listing fetched
/// just before; only older ones missing from it are gone.
const REGISTRATION_SETTLE_SECS: i64 = 60;
/// One repository is asked for its queued jobs this often, in turn.
const POLL_EVERY: Duration = Duration::from_secs(60);
/// Repositories with jobs this recent are polled.
const POLL_REPOSITORIES_SEEN_WITHIN_DAYS: i64 = 7;
/// A job created this recently may still have its delivery in flight.
const POLL_GRACE_SECS: i64 = 60;
/// The runner gauges are refreshed at most this often.
const GAUGES_EVERY: Duration = Duration::from_secs(5);
/// How long ended runners stay in the runners gauge.
const ENDED_GAUGE_WINDOW: Duration = Duration::from_secs(3600);
/// The App's installations are listed this often (and on the first pass).
const INSTALLATIONS_EVERY: Duration = Duration::from_secs(600);
/// Rows of each kind one sweep prunes at most (SPOT_RUNNERS_RETENTION_DAYS).
const PRUNE_BATCH: i64 = 500;

/// The outside world the reconciler acts on.
#[derive(Clone)]
pub struct Backends {
    pub cloud: Arc<dyn Cloud>,
    pub github: Arc<dyn GitHub>,
    /// Where JIT configs wait for their instance (never in user data).
    pub parameters: Arc<dyn ParameterStore>,
}

pub struct Reconciler {
    store: Arc<dyn Store>,
    backends: Backends,
    profiles: ProfileCache,
    metrics: Arc<Metrics>,
    controller_id: ControllerId,
    max_instances: u32,
    /// Names this process in provisioning leases.
    owner: String,
    clock: Arc<dyn Clock>,
    sweeps: Every,
    gauges: Every,
    polls: Every,
    installations: Every,
    /// Where runners may be registered before any job said so.
    scopes: KnownScopes,
    /// Profiles whose launches were refused as invalid requests.
    backoffs: Mutex<Backoffs>,
    /// Which recent repository is polled next.
    poll_turn: std::sync::atomic::AtomicUsize,
    launch_bucket: Mutex<TokenBucket>,
    jit_bucket: Mutex<TokenBucket>,
    provision_wake: Notify,
    /// Completed jobs and ended runners older than this are pruned.
    retention: Duration,
    /// Busy runners whose instance carries its job's cost tags already.
    cost_tagged: Mutex<BTreeSet<String>>,
}

/// What a pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Instances whose job completed, terminated this pass.
    pub terminated: usize,
    /// What the sweep found, when this pass swept (see [`Reconciler::sweep`]).
    pub sweep: Option<SweepReport>,
    pub rematched: usize,
    pub requested: usize,
}

/// What a sweep repaired.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Runners GitHub listed online for the first time.
    pub online: u64,
    /// Runners whose instance was found gone (reclaimed, shut down).
    pub gone: usize,
    /// Instances no live runner accounts for, terminated.
    pub orphan_instances: usize,
    /// Leftover GitHub registrations deleted.
    pub orphan_registrations: usize,
    /// Runners reaped for a boot, idle or lifetime limit.
    pub reaped: usize,
    /// Stale queued jobs checked against GitHub, and those found closed.
    pub stale_checked: usize,
    pub stale_closed: usize,
    /// Queued jobs found on GitHub that no delivery told us about.
    pub discovered: usize,
    /// JIT config parameters left behind (see [`jit_parameter_is_leftover`]), deleted.
    pub leftover_parameters: usize,
    /// Instances given their job's cost tags.
    pub cost_tagged: usize,
}

enum Failure {
    /// Give up on this runner (a final state); the planner makes a new one
    /// if the demand is still there.
    End { code: String, reason: String },
    /// Leave the row for a later claim (its lease runs out).
    Later,
}

impl Reconciler {
    pub fn new(
        store: Arc<dyn Store>,
        backends: Backends,
        profiles: ProfileCache,
        metrics: Arc<Metrics>,
        controller_id: ControllerId,
        max_instances: u32,
    ) -> Self {
        let owner = format!(
            "{}-{}-{:08x}",
            controller_id,
            std::process::id(),
            rand::thread_rng().gen::<u32>()
        );
        Self {
            store,
            profiles,
            metrics,
            controller_id,
            max_instances,
            owner,
            clock: Arc::new(SystemClock),
            sweeps: Every::new(SWEEP_EVERY),
            gauges: Every::new(GAUGES_EVERY),
            polls: Every::new(POLL_EVERY),
            installations: Every::new(INSTALLATIONS_EVERY),
            scopes: KnownScopes::default(),
            backoffs: Mutex::new(Backoffs::default()),
            poll_turn: std::sync::atomic::AtomicUsize::new(0),
            launch_bucket: Mutex::new(backends.cloud.launch_limit().client_side()),
            jit_bucket: Mutex::new(backends.github.jit_config_limit()),
            provision_wake: Notify::new(),
            retention: Duration::from_secs(30 * 86_400),
            cost_tagged: Mutex::new(BTreeSet::new()),
            backends,
        }
    }

    /// Keeps completed jobs and ended runners this long (default 30 days).
    #[must_use]
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Reads time from `clock` instead of the system's.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Shares the scopes known from configuration and webhooks.
    #[must_use]
    pub fn with_scopes(mut self, scopes: KnownScopes) -> Self {
        self.scopes = scopes;
        self
    }

    /// One reconcile pass over the ledger.
    pub async fn pass(&self) -> Result<PassReport, StoreError> {
        let started = tokio::time::Instant::now();
        let result = self.pass_inner().await;
        self.metrics
            .reconcile_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .reconcile_passes_total
            .with_label_values(&[outcome])
            .inc();
        result
    }

    async fn pass_inner(&self) -> Result<PassReport, StoreError> {
        let mut report = PassReport {
            terminated: self.finish_completed().await?,
            ..PassReport::default()
        };
        if self.installations.due(self.clock.now()) {
            self.learn_installations().await;
        }
        // Webhooks wake a pass each; what does not need to follow every
        // one of them runs at the sweep's pace.
        if self.sweeps.due(self.clock.now()) {
            report.sweep = self.sweep().await?;
            report.rematched = self.rematch().await?;
        }
        let profiles = self.profiles.get();
        let cap = self.max_instances;
        let now = self.clock.now();
        // A profile backed off gets no runners: each would be registered
        // at GitHub only to fail the same way.
        let planned: Vec<Profile> = {
            let mut backoffs = self.backoffs.lock().unwrap_or_else(PoisonError::into_inner);
            profiles
                .profiles
                .iter()
                .filter(|p| backoffs.blocking(p, now).is_none())
                .cloned()
                .collect()
        };
        let known = self.scopes.snapshot();
        let created = self
            .store
            .plan_runners(
                self.controller_id.as_str(),
                Box::new(move |snap| {
                    let mut demand = snap.demand.clone();
                    fill_warm_scopes(&planned, &mut demand, &known);
                    plan_launches(&planned, &demand, &snap.runners, cap)
                }),
            )
            .await?;
        report.requested = created.len();
        for r in &created {
            tracing::info!(runner = %r.name, profile = %r.profile, scope = %r.scope, "runner requested");
        }
        if !created.is_empty() {
            self.provision_wake.notify_one();
        }
        if self.gauges.due(self.clock.now()) {
            self.refresh_gauges().await?;
        }
        Ok(report)
    }

    /// Learns the orgs the App is installed in, so warm pools and orphan
    /// sweeps work there before any job arrives.
    async fn learn_installations(&self) {
        match self.backends.github.installations().await {
            Ok(list) => {
                for i in &list {
                    match i.scope() {
                        Some(scope) => {
                            if self.scopes.learn(scope) {
                                tracing::info!(org = %i.account, installation = i.id, "serving an org the App is installed in");
                            }
                        }
                        None => {
                            tracing::debug!(account = %i.account, kind = %i.account_type, "installation on a user account; its repositories are learned from their jobs")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing the App's installations failed; known scopes come from configuration and webhooks");
            }
        }
    }

    /// Jobs that arrived before a fitting profile existed.
    async fn rematch(&self) -> Result<usize, StoreError> {
        let mut rematched = 0;
        for (id, labels, repository) in self.store.unmatched_open_jobs(1000).await? {
            if let Ok(profile) = self.profiles.match_job(&labels, &repository) {
                self.store.set_job_profile(id, Ok(&profile)).await?;
                rematched += 1;
            }
        }
        Ok(rematched)
    }

    /// Terminates the instance of every runner whose job completed, at
    /// once: the instance would shut itself down, but that is the safety
    /// net for when this service is unreachable, not the plan.
    async fn finish_completed(&self) -> Result<usize, StoreError> {
        // Each runner is claimed (moved to `terminating`) by exactly one
        // replica before anyone calls EC2.
        let done = self.store.settle_jobs(self.controller_id.as_str()).await?;
        if done.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = done
            .iter()
            .filter_map(|(r, _)| r.instance_id.clone())
            .collect();
        if let Err(e) = self.terminate_now(&ids).await {
            tracing::warn!(error = %e, instances = ids.len(), "terminating finished instances failed; the sweep retries");
            return Ok(0);
        }
        let now = self.clock.now();
        for (r, completed_at) in &done {
            self.metrics
                .reaps_total
                .with_label_values(&[&r.profile, "completed"])
                .inc();
            if let Some(at) = completed_at {
                let secs = (now - *at).num_milliseconds().max(0) as f64 / 1000.0;
                self.metrics
                    .terminate_latency_seconds
                    .with_label_values(&[&r.profile])
                    .observe(secs);
            }
            tracing::info!(runner = %r.name, instance = ?r.instance_id, job_id = ?r.job_id, "job completed; instance terminated");
        }
        Ok(done.len())
    }

    /// Every `TerminateInstances` goes through here: retried a few times
    /// with backoff when EC2 throttles it (its bucket is 100, refilled at
    /// 5/s: a wave of completions can empty it). Instances still running
    /// after that are the orphan sweep's to terminate again.
    async fn terminate_now(&self, ids: &[String]) -> Result<(), CloudError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.backends.cloud.terminate(ids).await {
                Err(e)
                    if matches!(
                        e.kind,
                        CloudErrorKind::Throttled | CloudErrorKind::Transient
                    ) && attempt <= MAX_RETRIES =>
                {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                result => return result,
            }
        }
    }

    /// Compares the ledger with what EC2 and GitHub report and repairs the
    /// difference: runners come online, vanish, time out; orphans on
    /// either side go; stale queued jobs are checked. Only the replica
    /// holding the leadership lock sweeps, so two replicas never terminate
    /// or delete the same thing twice. Returns `None` when another leads.
    pub async fn sweep(&self) -> Result<Option<SweepReport>, StoreError> {
        let controller = self.controller_id.as_str();
        if !self.store.try_lead(controller).await? {
            return Ok(None);
        }
        let mut report = SweepReport::default();
        let now = self.clock.now();
        // Scopes of recently ended runners too: their leftover
        // registrations are swept. And every scope known from the App's
        // installations, configuration and webhooks, so a leftover is found
        // before any runner of ours was registered there.
        let mut scopes = self.store.runner_scopes(controller, ORPHAN_MEMORY).await?;
        for known in self.scopes.snapshot() {
            if !scopes.contains(&known) {
                scopes.push(known);
            }
        }
        let instances = match self.backends.cloud.list_owned(controller).await {
            Ok(list) => Some(list),
            Err(e) => {
                tracing::warn!(error = %e, "listing instances failed; instance sweeps skipped this time");
                None
            }
        };
        let listed = self.list_github_runners(&scopes).await;

        // Online and busy state from GitHub's list. Busy means taken,
        // whatever the ledger has heard: such a runner is not available for
        // queued demand, nor reaped as idle. The flag lags, so "not busy"
        // proves nothing: only an `in_progress` or the runner leaving
        // GitHub ends a busy spell.
        let named = |keep: fn(&GitHubRunner) -> bool| -> Vec<String> {
            listed
                .values()
                .flatten()
                .filter(|g| keep(g))
                .map(|g| g.name.clone())
                .collect()
        };
        report.online = self.store.mark_online(&named(|g| g.online), now).await?;
        self.store.mark_busy(&named(|g| g.busy), now).await?;
        // Read after marking, so states are as GitHub's list left them.
        let runners = self.store.runners(controller, Duration::ZERO).await?;

        if let Some(instances) = &instances {
            report.gone = self.sweep_gone(&runners, instances, now).await?;
            report.orphan_instances = self
                .sweep_orphan_instances(&runners, instances, now)
                .await?;
        }
        report.orphan_registrations = self.sweep_orphan_registrations(&listed).await?;
        report.reaped = self.reap_timeouts(&runners, now).await?;
        let suspects = self
            .runners_gone_from_github(&runners, &listed, now)
            .await?;
        let idle_profiles: Vec<String> = runners
            .iter()
            .filter(|r| r.state == RunnerState::Idle)
            .map(|r| r.profile.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let (checked, closed) = self.check_stale_jobs(suspects, &idle_profiles, now).await?;
        report.stale_checked = checked;
        report.stale_closed = closed;
        report.discovered = self.poll_queued_jobs(now).await?;
        let pruned = self
            .store
            .prune_ledger(controller, self.retention, PRUNE_BATCH)
            .await?;
        if pruned != spot_runners_store::Pruned::default() {
            tracing::info!(
                jobs = pruned.jobs,
                runners = pruned.runners,
                "pruned the ledger past its retention"
            );
        }
        report.leftover_parameters = self.sweep_jit_parameters().await?;
        report.cost_tagged = self.tag_costs(&runners).await?;
        Ok(Some(report))
    }

    /// One paginated list per scope our runners are registered in.
    async fn list_github_runners(
        &self,
        scopes: &[RunnerScope],
    ) -> BTreeMap<RunnerScope, Vec<GitHubRunner>> {
        let mut listed = BTreeMap::new();
        for scope in scopes {
            match self.backends.github.list_runners(scope).await {
                Ok(list) => {
                    listed.insert(scope.clone(), list);
                }
                Err(e) => {
                    tracing::warn!(%scope, error = %e, "listing GitHub runners failed; online state and registration sweep skipped for it");
                }
            }
        }
        listed
    }

    /// Ends runners whose instance is gone: reclaimed by EC2, shut down by
    /// its own watchdog, or terminated by us. Their capacity is free again,
    /// and the planner relaunches for demand that is still queued.
    async fn sweep_gone(
        &self,
        runners: &[RunnerRecord],
        owned: &[Instance],
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let mut gone = 0;
        for r in runners
            .iter()
            .filter(|r| r.instance_id.is_some() && r.state.is_live())
        {
            let instance = owned.iter().find(|i| Some(&i.id) == r.instance_id.as_ref());
            let vanished = match instance {
                Some(i) => !i.state.is_alive(),
                // EC2's listing lags a fresh launch by seconds: only an
                // instance missing well after its launch is gone.
                None => r
                    .launched_at
                    .is_some_and(|t| now - t > chrono::Duration::seconds(GONE_AFTER_SECS)),
            };
            if !vanished {
                continue;
            }
            let reason = instance
                .and_then(|i| i.state_reason.clone())
                .unwrap_or_else(|| "instance no longer listed".into());
            let state = if reason == "Server.SpotInstanceTermination" {
                RunnerState::Interrupted
            } else {
                RunnerState::Terminated
            };
            if state == RunnerState::Interrupted {
                crate::reruns::attribute_gone(self.store.as_ref(), &self.metrics, r, instance, now)
                    .await?;
            }
            if !matches!(r.state, RunnerState::Done | RunnerState::Terminating) {
                self.metrics
                    .orphans_total
                    .with_label_values(&["ledger_runner"])
                    .inc();
                self.metrics
                    .reaps_total
                    .with_label_values(&[&r.profile, state.as_str()])
                    .inc();
                tracing::warn!(runner = %r.name, instance = ?r.instance_id, %reason, was = %r.state, "instance is gone");
            }
            self.store
                .update_runner(
                    &r.name,
                    RunnerChange::Ended {
                        state,
                        code: None,
                        reason,
                    },
                )
                .await?;
            gone += 1;
        }
        Ok(gone)
    }

    /// Terminates instances carrying our controller tag that no live runner
    /// accounts for: unknown to the ledger (a launch lost in a crash), or
    /// belonging to a runner that has ended. A `terminating` runner whose
    /// instance still runs a while later (a lost terminate) is retried.
    async fn sweep_orphan_instances(
        &self,
        runners: &[RunnerRecord],
        owned: &[Instance],
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let alive: Vec<&Instance> = owned.iter().filter(|i| i.state.is_alive()).collect();
        let names: Vec<String> = alive.iter().filter_map(|i| i.runner_name.clone()).collect();
        let states = self
            .store
            .runner_states(self.controller_id.as_str(), &names)
            .await?;
        let retry_after = chrono::Duration::seconds(TERMINATE_RETRY_AFTER_SECS);
        let mut orphans = Vec::new();
        let mut retries = Vec::new();
        for i in alive {
            let state = i.runner_name.as_ref().and_then(|n| states.get(n)).copied();
            match state {
                Some(RunnerState::Terminating) => {
                    let stuck = runners.iter().any(|r| {
                        r.instance_id.as_deref() == Some(i.id.as_str())
                            && now - r.updated_at > retry_after
                    });
                    if stuck {
                        retries.push(i.id.clone());
                    }
                }
                // A second instance under a live runner's name (a resumed
                // launch whose first instance EC2 listed only later) is
                // nobody's: the runner uses the one the ledger names.
                Some(s)
                    if s.is_live()
                        && !runners.iter().any(|r| {
                            Some(&r.name) == i.runner_name.as_ref()
                                && r.instance_id.as_ref().is_some_and(|id| *id != i.id)
                        }) => {}
                _ => {
                    tracing::warn!(instance = %i.id, runner = ?i.runner_name, ledger = ?state, "orphaned instance; terminating");
                    orphans.push(i.id.clone());
                }
            }
        }
        let all: Vec<String> = orphans.iter().chain(&retries).cloned().collect();
        if all.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.terminate_now(&all).await {
            tracing::warn!(error = %e, instances = all.len(), "terminating orphaned instances failed; next sweep retries");
            return Ok(0);
        }
        self.metrics
            .orphans_total
            .with_label_values(&["instance"])
            .inc_by(orphans.len() as u64);
        Ok(orphans.len())
    }

    /// Deletes offline GitHub registrations with our name that no live
    /// runner accounts for: a JIT runner that finished but lingers, or one
    /// registered just before a crash. Online ones are left to finish what
    /// they are doing; their instances are the instance sweep's business.
    async fn sweep_orphan_registrations(
        &self,
        listed: &BTreeMap<RunnerScope, Vec<GitHubRunner>>,
    ) -> Result<usize, StoreError> {
        let profiles = self.profiles.get();
        let names: Vec<String> = listed.values().flatten().map(|g| g.name.clone()).collect();
        let states = self
            .store
            .runner_states(self.controller_id.as_str(), &names)
            .await?;
        let mut deleted = 0;
        for (scope, list) in listed {
            for g in list.iter().filter(|g| !g.online) {
                let known = states.get(&g.name).copied();
                let ours = known.is_some()
                    || RunnerName::parse_owned(
                        &g.name,
                        &self.controller_id,
                        profiles.profiles.iter().map(|p| &p.name),
                    )
                    .is_some();
                let accounted = known.is_some_and(|s| {
                    s.is_live() && !matches!(s, RunnerState::Done | RunnerState::Terminating)
                });
                if !ours || accounted {
                    continue;
                }
                match self.backends.github.delete_runner(scope, g.id).await {
                    Ok(()) => {
                        tracing::info!(runner = %g.name, %scope, ledger = ?known, "deleted a leftover GitHub registration");
                        if known.is_none() {
                            self.metrics
                                .orphans_total
                                .with_label_values(&["github_runner"])
                                .inc();
                        }
                        deleted += 1;
                    }
                    Err(e) => {
                        tracing::warn!(runner = %g.name, error = %e, "deleting a leftover GitHub registration failed; next sweep retries");
                    }
                }
            }
        }
        Ok(deleted)
    }

    /// Boot, idle and lifetime limits, decided by the pure reaper.
    async fn reap_timeouts(
        &self,
        runners: &[RunnerRecord],
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let ages: Vec<RunnerAge> = runners
            .iter()
            .filter(|r| r.state.is_live())
            .map(|r| RunnerAge {
                name: r.name.clone(),
                profile: r.profile.clone(),
                // GitHub's busy flag already moved runners to `busy`.
                state: r.state,
                launched_at: r.launched_at,
                online_at: r.online_at,
            })
            .collect();
        let demand = self.store.demand().await?;
        let profiles = self.profiles.get();
        let reaps = plan_reaps(&profiles.profiles, &demand, &ages, now);
        let mut instances = Vec::new();
        let mut ended = Vec::new();
        for reap in &reaps {
            let Some(r) = runners.iter().find(|r| r.name == reap.name) else {
                continue;
            };
            let reason = format!("reaped: {}", reap.reason.as_str());
            // Conditional on the state the decision saw: an `in_progress`
            // that just made it busy wins over an idle timeout.
            if !self
                .store
                .end_runner_if(&r.name, r.state, reap.reason.final_state(), &reason)
                .await?
            {
                continue;
            }
            self.metrics
                .reaps_total
                .with_label_values(&[&r.profile, reap.reason.as_str()])
                .inc();
            tracing::info!(runner = %r.name, instance = ?r.instance_id, reason = reap.reason.as_str(), "reaping runner");
            instances.extend(r.instance_id.clone());
            ended.push(r);
        }
        if !instances.is_empty() {
            if let Err(e) = self.terminate_now(&instances).await {
                // The runners have ended; the orphan sweep terminates what
                // is still running next time.
                tracing::warn!(error = %e, instances = instances.len(), "terminating reaped instances failed; the orphan sweep retries");
            }
        }
        for r in &ended {
            self.forget_registration(r).await;
        }
        Ok(ended.len())
    }

    /// GitHub does not resend a lost `queued` delivery, and without it a
    /// job is never covered (unless some other job's runner takes it). So,
    /// one repository a minute in turn, GitHub is asked for its queued jobs
    /// and those the ledger has never seen are recorded as if delivered.
    async fn poll_queued_jobs(&self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        if !self.polls.due(now) {
            return Ok(0);
        }
        let turn = self
            .poll_turn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let repositories = self
            .store
            .recent_repositories(now - chrono::Duration::days(POLL_REPOSITORIES_SEEN_WITHIN_DAYS))
            .await?;
        let Some(repo) = repositories.get(turn % repositories.len().max(1)) else {
            return Ok(0);
        };
        let jobs = match self.backends.github.queued_jobs(&repo.repository).await {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(repository = %repo.repository, error = %e, "listing queued jobs failed");
                return Ok(0);
            }
        };
        let grace = chrono::Duration::seconds(POLL_GRACE_SECS);
        let jobs: Vec<GitHubJob> = jobs
            .into_iter()
            .filter(|j| j.created_at.is_none_or(|t| now - t >= grace))
            .collect();
        let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
        let known = self.store.known_jobs(&ids).await?;
        let batch: Vec<IncomingDelivery> = jobs
            .into_iter()
            .filter(|j| !known.contains(&j.id))
            .map(|j| IncomingDelivery {
                delivery_id: format!("poll-{}", j.id),
                profile: self.profiles.match_job(&j.labels, &repo.repository),
                job: WorkflowJobEvent {
                    job_id: j.id,
                    run_id: j.run_id,
                    run_attempt: j.run_attempt,
                    status: JobStatus::Queued,
                    name: j.name,
                    workflow_name: j.workflow_name,
                    labels: j.labels,
                    conclusion: None,
                    runner_id: None,
                    runner_name: None,
                    repository: repo.repository.clone(),
                    owner: repo.owner.clone(),
                    org: repo.org.clone(),
                    installation_id: repo.installation_id,
                    html_url: j.html_url,
                    created_at: j.created_at,
                    started_at: None,
                    completed_at: None,
                },
            })
            .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        self.store
            .record_deliveries(
                &batch,
                tokio::time::Instant::now() + Duration::from_secs(10),
            )
            .await?;
        for d in &batch {
            tracing::warn!(job_id = d.job.job_id, repository = %d.job.repository, profile = ?d.profile.as_ref().ok(), "found a queued job no webhook told us about; recorded it");
        }
        self.metrics
            .stale_jobs_total
            .with_label_values(&["discovered"])
            .inc_by(batch.len() as u64);
        Ok(batch.len())
    }

    /// Runners whose GitHub registration is gone from a complete listing of
    /// their scope. A JIT runner leaves GitHub when its job ends, so a busy
    /// one probably finished and its `completed` was lost: its job is
    /// checked first thing. Any other (idle, booting, or busy with a job the
    /// ledger never saw) can never take a job again: it ends, and its
    /// instance goes.
    async fn runners_gone_from_github(
        &self,
        runners: &[RunnerRecord],
        listed: &BTreeMap<RunnerScope, Vec<GitHubRunner>>,
        now: DateTime<Utc>,
    ) -> Result<Vec<StaleJob>, StoreError> {
        let recheck = chrono::Duration::seconds(RECHECK_AFTER_SECS);
        // A runner launched after the listing was fetched is not in it.
        let settled = chrono::Duration::seconds(REGISTRATION_SETTLE_SECS);
        let mut suspects = Vec::new();
        let mut useless = Vec::new();
        for r in runners.iter().filter(|r| {
            matches!(
                r.state,
                RunnerState::Booting | RunnerState::Idle | RunnerState::Busy
            ) && r.launched_at.is_some_and(|t| now - t >= settled)
        }) {
            let Some(list) = listed.get(&r.scope) else {
                continue;
            };
            if list.iter().any(|g| g.name.eq_ignore_ascii_case(&r.name)) {
                continue;
            }
            let job = match (r.state, r.job_id) {
                (RunnerState::Busy, Some(id)) => self.store.job(id).await?,
                _ => None,
            };
            if let Some(job) = job {
                if job.status != JobStatus::Completed
                    && job.checked_at.is_none_or(|t| now - t >= recheck)
                {
                    suspects.push(StaleJob {
                        id: job.id,
                        repository: job.repository,
                        profile: job.profile,
                        first_seen_at: job.first_seen_at,
                    });
                }
                continue;
            }
            if self
                .store
                .end_runner_if(
                    &r.name,
                    r.state,
                    RunnerState::Terminated,
                    "its GitHub registration is gone",
                )
                .await?
            {
                useless.extend(r.instance_id.clone());
                let reason = if r.state == RunnerState::Busy {
                    "completed"
                } else {
                    "registration_gone"
                };
                self.metrics
                    .reaps_total
                    .with_label_values(&[&r.profile, reason])
                    .inc();
                tracing::warn!(runner = %r.name, instance = ?r.instance_id, was = %r.state, "runner's GitHub registration is gone; ending it");
            }
        }
        if !useless.is_empty() {
            if let Err(e) = self.terminate_now(&useless).await {
                tracing::warn!(error = %e, "terminating instances of unregistered runners failed; the orphan sweep retries");
            }
        }
        Ok(suspects)
    }

    /// Asks GitHub about jobs queued suspiciously long ([`stale`] says
    /// which), a few per sweep so the rate limit is never spent on it: a
    /// lost `completed` or `in_progress` would otherwise keep demand (and
    /// instances) alive.
    async fn check_stale_jobs(
        &self,
        suspects: Vec<StaleJob>,
        idle_profiles: &[String],
        now: DateTime<Utc>,
    ) -> Result<(usize, usize), StoreError> {
        let mut stale = suspects;
        stale.truncate(stale::CHECKS_PER_SWEEP);
        let room = (stale::CHECKS_PER_SWEEP - stale.len()) as i64;
        if room > 0 {
            stale.extend(
                self.store
                    .stale_jobs(&StaleCutoffs::at(now), idle_profiles, room)
                    .await?,
            );
        }
        let (mut checked, mut closed) = (0, 0);
        for job in stale {
            let check = match self.backends.github.job(&job.repository, job.id).await {
                Ok(report) => job_check(&report),
                Err(GitHubError::NotFound) => JobCheck::Gone,
                Err(e) => {
                    tracing::warn!(job_id = job.id, repository = %job.repository, error = %e, "checking a stale job failed; stale checks stop for this sweep");
                    break;
                }
            };
            checked += 1;
            self.store.record_job_check(job.id, &check, now).await?;
            self.metrics
                .stale_jobs_total
                .with_label_values(&[check.as_str()])
                .inc();
            if check != JobCheck::Queued {
                closed += 1;
                tracing::warn!(job_id = job.id, repository = %job.repository, outcome = check.as_str(), "stale job repaired from GitHub's jobs API (a webhook was lost)");
            }
        }
        Ok((checked, closed))
    }

    async fn refresh_gauges(&self) -> Result<(), StoreError> {
        let runners = self
            .store
            .runners(self.controller_id.as_str(), ENDED_GAUGE_WINDOW)
            .await?;
        let demand = self.store.demand().await?;
        self.metrics
            .set_oldest_queued(&demand, &self.profiles.get().profiles, self.clock.now());
        self.metrics.runners.reset();
        self.metrics.instances.reset();
        for r in &runners {
            self.metrics
                .runners
                .with_label_values(&[&r.profile, r.state.as_str()])
                .inc();
            if r.state.is_live() && r.instance_id.is_some() {
                let market = r.market.as_deref().unwrap_or("spot");
                self.metrics
                    .instances
                    .with_label_values(&[&r.profile, market])
                    .inc();
            }
        }
        Ok(())
    }

    /// Runs passes on every wake-up and every `interval`, and provisions
    /// beside them, until `stop`.
    pub async fn run(
        self: Arc<Self>,
        wake: Arc<Notify>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let provisioner = tokio::spawn(Arc::clone(&self).provision_loop(stop.clone()));
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "reconcile pass failed");
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
        let _ = provisioner.await;
    }

    async fn provision_loop(self: Arc<Self>, stop: CancellationToken) {
        loop {
            while !stop.is_cancelled() {
                match self.provision_batch().await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming runners to provision failed");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.provision_wake.notified() => {}
                // Picks up rows whose lease ran out (a crashed replica's).
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Claims a batch of rows that need provisioning and drives each to
    /// `booting` or a final state. Returns how many were claimed.
    pub async fn provision_batch(self: &Arc<Self>) -> Result<usize, StoreError> {
        let claimed = self
            .store
            .claim_provisioning(
                self.controller_id.as_str(),
                &self.owner,
                DEFAULT_LEASE,
                CLAIM_BATCH,
            )
            .await?;
        let n = claimed.len();
        let names: Vec<String> = claimed.iter().map(|r| r.name.clone()).collect();
        let mut tasks = JoinSet::new();
        for runner in claimed {
            let me = Arc::clone(self);
            tasks.spawn(async move { me.provision(runner).await });
        }
        // Keeps the claims alive while the batch waits on rate limits and
        // calls; if this process dies, they lapse within one lease.
        let mut renew = tokio::time::interval(DEFAULT_LEASE / 3);
        renew.tick().await;
        loop {
            tokio::select! {
                joined = tasks.join_next() => if joined.is_none() { break },
                _ = renew.tick() => {
                    if let Err(e) = self.store.renew_leases(&names, &self.owner, DEFAULT_LEASE).await {
                        tracing::warn!(error = %e, "renewing provisioning leases failed");
                    }
                }
            }
        }
        Ok(n)
    }

    async fn provision(&self, runner: RunnerRecord) {
        let name = runner.name.clone();
        if let Err(failure) = self.provision_inner(runner.clone()).await {
            match failure {
                Failure::End { code, reason } => {
                    tracing::warn!(runner = %name, code = %code, reason = %reason, "launch failed");
                    if backoff::backs_off(&code) {
                        self.back_off(&runner.profile, &code, &reason);
                    }
                    let change = RunnerChange::Ended {
                        state: RunnerState::LaunchFailed,
                        code: Some(code),
                        reason,
                    };
                    if let Err(e) = self.store.update_runner(&name, change).await {
                        tracing::warn!(runner = %name, error = %e, "recording a failed launch failed");
                    }
                }
                Failure::Later => {
                    tracing::info!(runner = %name, "provisioning postponed");
                    let change = RunnerChange::Postpone {
                        retry_in: RETRY_LATER,
                    };
                    if let Err(e) = self.store.update_runner(&name, change).await {
                        tracing::warn!(runner = %name, error = %e, "postponing a runner failed; its lease will run out");
                    }
                    self.provision_wake.notify_one();
                }
            }
        }
    }

    /// Backs the profile off after an invalid request (see
    /// [`backoff`]): no runner is planned for it until the delay passes or
    /// the row changes.
    fn back_off(&self, profile: &str, code: &str, reason: &str) {
        let profiles = self.profiles.get();
        let Some(p) = profiles
            .profiles
            .iter()
            .find(|p| p.name.as_str() == profile)
        else {
            return;
        };
        let now = self.clock.now();
        let mut backoffs = self.backoffs.lock().unwrap_or_else(PoisonError::into_inner);
        let b = backoffs.failed(p, code, reason, now);
        tracing::warn!(
            profile, code, failures = b.failures, retry_in_secs = (b.until - now).num_seconds(),
            "profile backed off: its launches are refused as invalid requests; fix the instance_profiles row (an edit that changes what is launched retries at once)"
        );
    }

    async fn provision_inner(&self, mut runner: RunnerRecord) -> Result<(), Failure> {
        let profiles = self.profiles.get();
        let Some(profile) = profiles
            .profiles
            .iter()
            .find(|p| p.name.as_str() == runner.profile)
            .cloned()
        else {
            self.forget_registration(&runner).await;
            return Err(Failure::End {
                code: "ProfileGone".into(),
                reason: format!("profile {} no longer exists or is invalid", runner.profile),
            });
        };
        // Re-run demand, an open spot breaker or a job history longer than
        // the profile's spot limit moves the launch to on-demand.
        let choice = crate::reruns::choose_runner_market(
            self.store.as_ref(),
            self.controller_id.as_str(),
            &runner,
            &profile,
            self.clock.now(),
        )
        .await
        .map_err(|_| Failure::Later)?;
        tracing::info!(runner = %runner.name, market = %choice.market, reason = %choice.reason, "market chosen");
        let candidates = choice.candidates(&profile);
        let mut first_attempt = 0;
        match runner.state {
            RunnerState::Launching => {
                if self.adopt(&runner).await? {
                    return Ok(());
                }
                // The attempt the crash interrupted is resumed with its own
                // token: if its RunInstances never reached EC2 it launches
                // now; if it did, EC2 answers for that token.
                first_attempt = candidates
                    .iter()
                    .position(|(t, s, m)| {
                        runner.instance_type.as_deref() == Some(t.as_str())
                            && runner.subnet_id == *s
                            && runner.market.as_deref() == Some(m.as_str())
                    })
                    .unwrap_or(0);
                tracing::info!(runner = %runner.name, attempt = first_attempt, "resuming an interrupted launch");
                self.forget_registration(&runner).await;
                self.update(&runner.name, RunnerChange::Requeue).await?;
                runner.github_runner_id = None;
            }
            RunnerState::Registered => {
                // The JIT config lived only in the memory of a process that
                // is gone; GitHub will not issue it twice.
                self.forget_registration(&runner).await;
                self.update(&runner.name, RunnerChange::Requeue).await?;
                runner.github_runner_id = None;
            }
            _ => {}
        }
        let blocked = self
            .backoffs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .blocking(&profile, self.clock.now())
            .map(|b| {
                format!(
                    "profile {} is backed off after {} invalid request(s) ({}: {})",
                    profile.name, b.failures, b.code, b.reason
                )
            });
        if let Some(reason) = blocked {
            self.forget_registration(&runner).await;
            return Err(Failure::End {
                code: backoff::BACKED_OFF_CODE.into(),
                reason,
            });
        }
        if let Err(reason) = backoff::preflight(&profile) {
            self.forget_registration(&runner).await;
            return Err(Failure::End {
                code: backoff::PREFLIGHT_CODE.into(),
                reason,
            });
        }
        let jit = self.register(&runner, &profile).await?;
        runner.github_runner_id = Some(jit.runner_id);
        if let Err(failure) = self.store_jit_config(&runner, &jit).await {
            self.forget_registration(&runner).await;
            return Err(failure);
        }
        self.update(
            &runner.name,
            RunnerChange::Registered {
                github_runner_id: jit.runner_id,
            },
        )
        .await?;
        let result = self
            .launch(&runner, &profile, &candidates, first_attempt)
            .await;
        // A postponed launch may have an instance already (its row stays
        // `launching` and is adopted): its registration and config must stay.
        if matches!(result, Err(Failure::End { .. })) {
            self.forget_registration(&runner).await;
        }
        result
    }

    async fn update(&self, name: &str, change: RunnerChange) -> Result<(), Failure> {
        self.store.update_runner(name, change).await.map_err(|e| {
            tracing::warn!(runner = %name, error = %e, "updating a runner failed");
            Failure::Later
        })
    }

    /// A launch whose outcome is unknown (a crash during `RunInstances`, or
    /// a token EC2 says was used before): adopts a live instance carrying
    /// the runner's tag, if there is one. Returns whether it did.
    async fn adopt(&self, runner: &RunnerRecord) -> Result<bool, Failure> {
        let owned = self
            .backends
            .cloud
            .list_owned(self.controller_id.as_str())
            .await
            .map_err(|e| {
                tracing::warn!(runner = %runner.name, error = %e, "listing instances failed");
                Failure::Later
            })?;
        if let Some(instance) = owned
            .into_iter()
            .find(|i| i.runner_name.as_deref() == Some(runner.name.as_str()) && i.state.is_alive())
        {
            tracing::info!(runner = %runner.name, instance = %instance.id, "adopted the instance of an interrupted launch");
            self.grant_jit_config(&runner.name, &instance).await?;
            self.update(
                &runner.name,
                RunnerChange::Booting {
                    instance_id: instance.id,
                    instance_type: instance.instance_type,
                    subnet_id: instance.subnet_id,
                    market: instance.market.as_str().to_owned(),
                },
            )
            .await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Deletes the runner's GitHub registration, if it has one, and its
    /// JIT config parameter.
    async fn forget_registration(&self, runner: &RunnerRecord) {
        if let Some(id) = runner.github_runner_id {
            if let Err(e) = self.backends.github.delete_runner(&runner.scope, id).await {
                tracing::warn!(runner = %runner.name, error = %e, "deleting the GitHub registration failed; the orphan sweep will retry");
            }
        }
        self.forget_jit_config(&runner.name).await;
    }

    async fn pace(bucket: &Mutex<TokenBucket>) {
        let wait = match bucket.lock() {
            Ok(mut b) => b.reserve(tokio::time::Instant::now().into_std()),
            Err(p) => p
                .into_inner()
                .reserve(tokio::time::Instant::now().into_std()),
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    async fn register(
        &self,
        runner: &RunnerRecord,
        profile: &Profile,
    ) -> Result<JitConfig, Failure> {
        let request = JitRequest {
            name: runner.name.clone(),
            runner_group_id: profile.runner_group_id,
            labels: profile.runner_labels(),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            Self::pace(&self.jit_bucket).await;
            match self
                .backends
                .github
                .generate_jit_config(&runner.scope, &request)
                .await
            {
                Ok(jit) => return Ok(jit),
                Err(GitHubError::NameTaken) if attempt <= MAX_RETRIES => {
                    // A crash between GitHub's answer and our write: the
                    // config is gone, so delete the registration and ask again.
                    self.delete_by_name(&runner.scope, &runner.name).await?;
                }
                Err(GitHubError::RateLimited(wait))
                    if wait <= MAX_WAIT && attempt <= MAX_RETRIES =>
                {
                    tokio::time::sleep(wait).await;
                }
                Err(GitHubError::Transient(e)) if attempt <= MAX_RETRIES => {
                    tracing::info!(runner = %runner.name, error = %e, "GitHub failed; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(GitHubError::RateLimited(_) | GitHubError::Transient(_)) => {
                    return Err(Failure::Later)
                }
                Err(e) => {
                    return Err(Failure::End {
                        code: "GitHubRefused".into(),
                        reason: e.to_string(),
                    })
                }
            }
        }
    }

    async fn delete_by_name(&self, scope: &RunnerScope, name: &str) -> Result<(), Failure> {
        let runners = self
            .backends
            .github
            .list_runners(scope)
            .await
            .map_err(|e| {
                tracing::warn!(runner = %name, error = %e, "listing GitHub runners failed");
                Failure::Later
            })?;
        for r in runners.iter().filter(|r| r.name == name) {
            self.backends
                .github
                .delete_runner(scope, r.id)
                .await
                .map_err(|_| Failure::Later)?;
        }
        Ok(())
    }

    /// The instance type × subnet × market walk, from `first_attempt` on;
    /// each attempt sends its own `ClientToken`.
    async fn launch(
        &self,
        runner: &RunnerRecord,
        profile: &Profile,
        candidates: &[(String, Option<String>, spot_runners_domain::Market)],
        first_attempt: usize,
    ) -> Result<(), Failure> {
        let user_data = render(&UserDataValues {
            controller_id: self.controller_id.as_str(),
            runner_name: &runner.name,
            profile,
        })
        .map_err(|e| Failure::End {
            code: "UserData".into(),
            reason: e.to_string(),
        })?;
        let mut last: Option<CloudError> = None;
        for (attempt, (instance_type, subnet_id, market)) in
            candidates.iter().cloned().enumerate().skip(first_attempt)
        {
            let request = LaunchRequest {
                runner_name: runner.name.clone(),
                client_token: client_token(
                    &runner.name,
                    u32::try_from(attempt).unwrap_or(u32::MAX),
                ),
                controller_id: self.controller_id.to_string(),
                profile: profile.name.to_string(),
                instance_type: instance_type.clone(),
                subnet_id: subnet_id.clone(),
                image: profile.image.clone(),
                threads_per_core: profile.threads_per_core,
                security_group_ids: profile.security_group_ids.clone(),
                iam_instance_profile: profile.iam_instance_profile.clone(),
                market,
                root_volume_gb: profile.root_volume_gb,
                user_data: user_data.clone(),
            };
            let mut attempt = 0;
            loop {
                attempt += 1;
                Self::pace(&self.launch_bucket).await;
                self.update(
                    &runner.name,
                    RunnerChange::Launching {
                        instance_type: instance_type.clone(),
                        subnet_id: subnet_id.clone(),
                        market: market.as_str().to_owned(),
                    },
                )
                .await?;
                if let Some(since) = runner.demand_since {
                    let secs = (self.clock.now() - since).num_milliseconds().max(0) as f64 / 1000.0;
                    self.metrics
                        .launch_latency_seconds
                        .with_label_values(&[profile.name.as_str()])
                        .observe(secs);
                }
                match self.backends.cloud.launch(&request).await {
                    Ok(instance) => {
                        self.metrics
                            .launches_total
                            .with_label_values(&[
                                profile.name.as_str(),
                                market.as_str(),
                                "launched",
                            ])
                            .inc();
                        tracing::info!(
                            runner = %runner.name, instance = %instance.id, instance_type = %instance_type,
                            market = %market, "instance launched"
                        );
                        self.backoffs
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .launched(profile.name.as_str());
                        self.grant_jit_config(&runner.name, &instance).await?;
                        return self
                            .update(
                                &runner.name,
                                RunnerChange::Booting {
                                    instance_id: instance.id,
                                    instance_type,
                                    subnet_id,
                                    market: market.as_str().to_owned(),
                                },
                            )
                            .await;
                    }
                    Err(e) => {
                        self.metrics
                            .launches_total
                            .with_label_values(&[profile.name.as_str(), market.as_str(), "failed"])
                            .inc();
                        self.metrics
                            .launch_errors_total
                            .with_label_values(&[profile.name.as_str(), &e.code])
                            .inc();
                        let _ = self
                            .store
                            .update_runner(
                                &runner.name,
                                RunnerChange::AttemptFailed {
                                    code: e.code.clone(),
                                    message: e.message.clone(),
                                },
                            )
                            .await;
                        tracing::info!(runner = %runner.name, instance_type = %instance_type, market = %market, code = %e.code, "launch attempt failed");
                        let kind = e.kind;
                        last = Some(e);
                        match kind {
                            CloudErrorKind::Capacity => break,
                            // Used before by an attempt whose outcome we
                            // never learned: its instance, if any, is ours.
                            CloudErrorKind::TokenSpent => {
                                if self.adopt(runner).await? {
                                    return Ok(());
                                }
                                break;
                            }
                            CloudErrorKind::Throttled if attempt <= MAX_THROTTLED_RETRIES => {
                                tokio::time::sleep(backoff(attempt)).await;
                            }
                            CloudErrorKind::Transient if attempt <= MAX_RETRIES => {
                                tokio::time::sleep(backoff(attempt)).await;
                            }
                            CloudErrorKind::Throttled | CloudErrorKind::Transient => break,
                            CloudErrorKind::Invalid | CloudErrorKind::AccountSetup => {
                                let e =
                                    last.unwrap_or_else(|| CloudError::from_code("Unknown", ""));
                                return Err(Failure::End {
                                    code: e.code,
                                    reason: e.message,
                                });
                            }
                        }
                    }
                }
            }
        }
        let e = last.unwrap_or_else(|| {
            CloudError::from_code("NoCandidates", "the profile names nothing to launch")
        });
        Err(Failure::End {
            code: e.code,
            reason: format!(
                "every instance type, subnet and market was tried: {}",
                e.message
            ),
        })
    }
}

/// "At most this often", by the injected clock: webhooks wake a pass each,
/// and what need not follow every one of them is paced by one of these.
struct Every {
    period: chrono::Duration,
    last: Mutex<Option<DateTime<Utc>>>,
}

impl Every {
    fn new(period: Duration) -> Self {
        Self {
            period: chrono::Duration::from_std(period).unwrap_or(chrono::Duration::MAX),
            last: Mutex::new(None),
        }
    }

    /// Whether the period has passed since the last time this said yes.
    fn due(&self, now: DateTime<Utc>) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let due = last.is_none_or(|t| now - t >= self.period);
        if due {
            *last = Some(now);
        }
        due
    }
}

/// What GitHub's jobs API says, in the ledger's terms.
fn job_check(report: &JobReport) -> JobCheck {
    match report.status.as_str() {
        "queued" | "waiting" | "pending" | "requested" => JobCheck::Queued,
        "in_progress" => JobCheck::Started {
            runner_name: report.runner_name.clone(),
        },
        // completed, and anything newer GitHub may invent: not demand.
        _ => JobCheck::Finished {
            conclusion: report.conclusion.clone(),
            runner_name: report.runner_name.clone(),
        },
    }
}

/// Exponential backoff with jitter, from 250 ms, at most 16 s.
fn backoff(attempt: u32) -> Duration {
    let cap = 250u64.saturating_mul(1 << attempt.min(6));
    Duration::from_millis(rand::thread_rng().gen_range(cap / 2..=cap))
}
