//! Sweeps: compare the ledger with what EC2 and GitHub list and repair the
//! difference — runners come online, vanish, time out; orphans on either
//! side go; stale queued jobs are checked (`jobs.rs`). The decisions are the
//! domain's pure functions ([`spot_runners_domain::sweeps`],
//! [`spot_runners_domain::reaper`]); this module gathers their snapshots and
//! carries their actions out.

mod cost_tags;
mod jobs;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use spot_runners_domain::api_budget::Spending;
use spot_runners_domain::ports::{GitHubError, GitHubRunner, Instance, RunnerScope};
use spot_runners_domain::reaper::{plan_reaps, RunnerAge};
use spot_runners_domain::store::{Pruned, RunnerRecord, StaleJob, StoreError};
use spot_runners_domain::sweeps::{self as decide, RegistrationGone};
use spot_runners_domain::{RunnerName, RunnerState};

pub use jobs::POLL_EVERY;

use crate::retry::lock;
use crate::{survival, Reconciler, SWEEP_EVERY};

/// The scopes of runners that ended this recently are still listed, so a
/// leftover registration of theirs is found.
const ORPHAN_MEMORY: Duration = Duration::from_secs(24 * 3600);
/// On a tight GitHub budget runners are listed on one sweep in this many
/// (once a minute at [`SWEEP_EVERY`]).
const SWEEPS_PER_MINUTE: u64 = 6;
/// Rows of each kind one sweep prunes at most (SPOT_RUNNERS_RETENTION_DAYS).
const PRUNE_BATCH: i64 = 500;

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
    /// Reaps GitHub refused (the runner is running a job): left alone.
    pub reap_refused: usize,
    /// Runners ended because their GitHub registration is gone.
    pub registrations_gone: usize,
    /// Stale queued jobs checked against GitHub, and those found closed.
    pub stale_checked: usize,
    pub stale_closed: usize,
    /// Queued jobs found on GitHub that no delivery told us about.
    pub discovered: usize,
    /// JIT config parameters left behind
    /// ([`spot_runners_domain::parameters::jit_parameter_is_leftover`]), deleted.
    pub leftover_parameters: usize,
    /// Instances given their job's cost tags.
    pub cost_tagged: usize,
}

impl Reconciler {
    /// One sweep. Only the replica holding the leadership lock sweeps, so
    /// two replicas never terminate or delete the same thing twice.
    /// Returns `None` when another leads.
    pub async fn sweep(&self) -> Result<Option<SweepReport>, StoreError> {
        let controller = self.controller_id.as_str();
        if !self.store.try_lead(controller).await? {
            return Ok(None);
        }
        let mut report = SweepReport::default();
        let now = self.clock.now();
        let spending = self.spending(now);
        if spending == Spending::Full && self.installations.due(now) {
            self.learn_installations().await;
        }
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
        let sweep = self.sweep_count.fetch_add(1, Ordering::Relaxed);
        let listed = if spending.lists_runners(sweep, SWEEPS_PER_MINUTE) {
            self.list_github_runners(&scopes).await
        } else {
            // Every scope unlisted: online state and the registration
            // sweep wait for the next listing, as after a failed one.
            BTreeMap::new()
        };

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
        report.online = self
            .store
            .mark_online(controller, &named(|g| g.online), now)
            .await?;
        self.store
            .mark_busy(controller, &named(|g| g.busy), now)
            .await?;
        // Read after marking, so states are as GitHub's list left them.
        let runners = self.store.runners(controller, Duration::ZERO).await?;

        report.gone = self.end_done_without_instance(&runners).await?;
        if let Some(instances) = &instances {
            report.gone += self.sweep_gone(&runners, instances, now).await?;
            report.orphan_instances = self
                .sweep_orphan_instances(&runners, instances, now)
                .await?;
        }
        report.orphan_registrations = self.sweep_orphan_registrations(&listed).await?;
        (report.reaped, report.reap_refused) = self.reap_timeouts(&runners, now).await?;
        let (suspects, ended) = self
            .runners_gone_from_github(&runners, &listed, now)
            .await?;
        report.registrations_gone = ended;
        let idle_profiles: Vec<String> = runners
            .iter()
            .filter(|r| r.state == RunnerState::Idle)
            .map(|r| r.profile.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let (checked, closed) = self
            .check_stale_jobs(suspects, &idle_profiles, spending, now)
            .await?;
        report.stale_checked = checked;
        report.stale_closed = closed;
        report.discovered = self.poll_queued_jobs(spending, now).await?;
        let pruned = self
            .store
            .prune_ledger(controller, self.retention, PRUNE_BATCH)
            .await?;
        if pruned != Pruned::default() {
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

    /// How freely this sweep may spend GitHub's budget, from the rate limit
    /// GitHub last reported; a change is logged.
    pub(crate) fn spending(&self, now: DateTime<Utc>) -> Spending {
        let limit = self.backends.github.rate_limit();
        let spending = Spending::of(limit, now);
        let before = std::mem::replace(&mut *lock(&self.spending), spending);
        if spending != before {
            let (remaining, of) =
                limit.map_or((None, None), |l| (Some(l.remaining), Some(l.limit)));
            if spending > before {
                tracing::warn!(
                    spending = spending.as_str(),
                    remaining,
                    limit = of,
                    "GitHub's rate limit is running low; sweeps spend less (JIT registrations and deletes go first)"
                );
            } else {
                tracing::info!(
                    spending = spending.as_str(),
                    remaining,
                    limit = of,
                    "GitHub's rate limit recovered; sweeps spend more again"
                );
            }
        }
        self.metrics.github_spending(spending);
        spending
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
                            tracing::debug!(account = %i.account, kind = %i.account_type, "installation on a user account; its repositories are learned from their jobs");
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing the App's installations failed; known scopes come from configuration and webhooks");
            }
        }
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

    /// Ends `done` rows that never got an instance id
    /// ([`decide::ended_before_launch_recorded`]).
    async fn end_done_without_instance(
        &self,
        runners: &[RunnerRecord],
    ) -> Result<usize, StoreError> {
        let mut ended = 0;
        for r in decide::ended_before_launch_recorded(runners) {
            let reason = "its job completed before its instance was recorded";
            if self
                .store
                .end_runner_if(&r.name, RunnerState::Done, RunnerState::Terminated, reason)
                .await?
            {
                tracing::warn!(runner = %r.name, "{reason}; ended (any instance of it is an orphan now)");
                self.forget_registration(r).await;
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Ends runners whose instance is gone ([`decide::instances_gone`]).
    /// Their capacity is free again, and the planner relaunches for demand
    /// that is still queued.
    async fn sweep_gone(
        &self,
        runners: &[RunnerRecord],
        owned: &[Instance],
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let mut gone = 0;
        for g in decide::instances_gone(runners, owned, now) {
            // Conditional on the state the decision saw.
            if !self
                .store
                .end_runner_if(&g.name, g.was, g.state, &g.reason)
                .await?
            {
                continue;
            }
            if g.state == RunnerState::Interrupted {
                if let Some(r) = runners.iter().find(|r| r.name == g.name) {
                    let instance = r
                        .instance_id
                        .as_deref()
                        .and_then(|id| owned.iter().find(|i| i.id == id));
                    survival::attribute_gone(
                        self.store.as_ref(),
                        self.metrics.as_ref(),
                        r,
                        instance,
                        now,
                    )
                    .await?;
                }
            }
            if !g.expected {
                self.metrics.instance_lost(&g.profile, g.was, g.state);
                tracing::warn!(runner = %g.name, reason = %g.reason, was = %g.was, "instance is gone");
            }
            gone += 1;
        }
        Ok(gone)
    }

    /// Terminates instances no live runner accounts for
    /// ([`decide::orphan_instances`]), and retries lost terminates.
    async fn sweep_orphan_instances(
        &self,
        runners: &[RunnerRecord],
        owned: &[Instance],
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let names: Vec<String> = owned
            .iter()
            .filter(|i| i.state.is_alive())
            .filter_map(|i| i.runner_name.clone())
            .collect();
        // Read now, not from `runners`: rows ended earlier in this sweep
        // make their instances orphans at once.
        let states = self
            .store
            .runner_states(self.controller_id.as_str(), &names)
            .await?;
        let found = decide::orphan_instances(owned, &states, runners, now);
        for id in &found.orphans {
            tracing::warn!(instance = %id, "orphaned instance; terminating");
        }
        let all: Vec<String> = found
            .orphans
            .iter()
            .chain(&found.retries)
            .cloned()
            .collect();
        if all.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.terminate_now(&all).await {
            tracing::warn!(error = %e, instances = all.len(), "terminating orphaned instances failed; next sweep retries");
            return Ok(0);
        }
        self.metrics.orphans("instance", found.orphans.len() as u64);
        Ok(found.orphans.len())
    }

    /// Deletes leftover registrations ([`decide::orphan_registrations`]).
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
        let is_ours = |name: &str| {
            RunnerName::parse_owned(
                name,
                &self.controller_id,
                profiles.profiles.iter().map(|p| &p.name),
            )
            .is_some()
        };
        let mut deleted = 0;
        for o in decide::orphan_registrations(listed, &states, is_ours) {
            match self.backends.github.delete_runner(&o.scope, o.id).await {
                Ok(()) => {
                    tracing::info!(runner = %o.name, scope = %o.scope, ledger = ?o.known, "deleted a leftover GitHub registration");
                    if o.known.is_none() {
                        self.metrics.orphans("github_runner", 1);
                    }
                    deleted += 1;
                }
                Err(e) => {
                    tracing::warn!(runner = %o.name, error = %e, "deleting a leftover GitHub registration failed; next sweep retries");
                }
            }
        }
        Ok(deleted)
    }

    /// Boot, idle and lifetime limits, decided by the pure reaper. Each
    /// runner's registration is deleted first, and its instance terminated
    /// only when GitHub accepted: GitHub refuses to delete a runner that is
    /// running a job, and that refusal — not the lagging busy flag — is the
    /// proof it is busy. Returns (reaped, refused).
    async fn reap_timeouts(
        &self,
        runners: &[RunnerRecord],
        now: DateTime<Utc>,
    ) -> Result<(usize, usize), StoreError> {
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
        let (mut instances, mut reaped, mut refused) = (Vec::new(), 0, 0);
        for reap in &reaps {
            let Some(r) = runners.iter().find(|r| r.name == reap.name) else {
                continue;
            };
            if !self.deregister_for_reap(r).await {
                refused += 1;
                continue;
            }
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
            self.metrics.reaped(&r.profile, reap.reason.as_str());
            tracing::info!(runner = %r.name, instance = ?r.instance_id, reason = reap.reason.as_str(), "reaping runner");
            instances.extend(r.instance_id.clone());
            reaped += 1;
        }
        if let Err(e) = self.terminate_now(&instances).await {
            // The runners have ended; the orphan sweep terminates what is
            // still running next time.
            tracing::warn!(error = %e, instances = instances.len(), "terminating reaped instances failed; the orphan sweep retries");
        }
        Ok((reaped, refused))
    }

    /// Deletes a runner's registration before its instance goes. `false`
    /// when GitHub refused (it is running a job) or could not be asked:
    /// the runner is left alone this sweep.
    async fn deregister_for_reap(&self, r: &RunnerRecord) -> bool {
        let Some(id) = r.github_runner_id else {
            return true;
        };
        match self.backends.github.delete_runner(&r.scope, id).await {
            Ok(()) | Err(GitHubError::NotFound) => true,
            Err(GitHubError::Refused(why)) => {
                tracing::info!(runner = %r.name, reason = %why, "GitHub refused to delete the runner (it is running a job); not reaped");
                false
            }
            Err(e) => {
                tracing::warn!(runner = %r.name, error = %e, "deleting the runner's registration failed; reaping it next sweep");
                false
            }
        }
    }

    /// Runners whose registration is gone from two listings a sweep apart
    /// ([`decide::registrations_gone`]). A JIT runner leaves GitHub when
    /// its job ends, so a busy one probably finished and its `completed`
    /// was lost: its job is returned to be checked first. Any other can
    /// never take a job again: it ends, and its instance goes.
    async fn runners_gone_from_github(
        &self,
        runners: &[RunnerRecord],
        listed: &BTreeMap<RunnerScope, Vec<GitHubRunner>>,
        now: DateTime<Utc>,
    ) -> Result<(Vec<StaleJob>, usize), StoreError> {
        let apart = chrono::Duration::from_std(SWEEP_EVERY).unwrap_or(chrono::Duration::MAX);
        let decided = {
            let missing = lock(&self.missing);
            decide::registrations_gone(runners, listed, &missing, apart, now)
        };
        *lock(&self.missing) = decided.missing;
        let mut suspects = Vec::new();
        let mut useless = Vec::new();
        let mut ended = 0;
        for g in decided.gone {
            if let Some(job) = self.busy_job(&g).await? {
                if decide::suspect_due(&job, now) {
                    suspects.push(StaleJob {
                        id: job.id,
                        repository: job.repository,
                        profile: job.profile,
                        first_seen_at: job.first_seen_at,
                    });
                }
                continue;
            }
            if !self
                .store
                .end_runner_if(
                    &g.name,
                    g.was,
                    RunnerState::Terminated,
                    "its GitHub registration is gone",
                )
                .await?
            {
                continue;
            }
            ended += 1;
            let instance = runners
                .iter()
                .find(|r| r.name == g.name)
                .and_then(|r| r.instance_id.clone());
            useless.extend(instance.clone());
            let reason = if g.was == RunnerState::Busy {
                "completed"
            } else {
                "registration_gone"
            };
            self.metrics.reaped(&g.profile, reason);
            tracing::warn!(runner = %g.name, instance = ?instance, was = %g.was, "runner's GitHub registration is gone; ending it");
        }
        if let Err(e) = self.terminate_now(&useless).await {
            tracing::warn!(error = %e, "terminating instances of unregistered runners failed; the orphan sweep retries");
        }
        Ok((suspects, ended))
    }

    async fn busy_job(
        &self,
        g: &RegistrationGone,
    ) -> Result<Option<spot_runners_domain::store::JobRecord>, StoreError> {
        match g.job_id {
            Some(id) => self.store.job(id).await,
            None => Ok(None),
        }
    }
}
