//! A pass: quick, and only the store. Settle what the webhooks said (and
//! terminate what completed), re-match jobs that arrived before their
//! profile, plan under the store's lock, and say when the gauges are due
//! (their own task counts them). Every webhook wakes one, so nothing slow
//! belongs here.

use std::sync::Arc;
use std::time::Duration;

use spot_runners_domain::planner::plan_launches;
use spot_runners_domain::scopes::fill_warm_scopes;
use spot_runners_domain::store::StoreError;
use spot_runners_domain::Profile;

use tokio_util::sync::CancellationToken;

use crate::metrics::Fleet;
use crate::retry::lock;
use crate::Reconciler;

/// The runner gauges are refreshed at most this often.
pub const GAUGES_EVERY: Duration = Duration::from_secs(5);
/// How long ended runners stay in the runners gauge.
const ENDED_GAUGE_WINDOW: Duration = Duration::from_secs(3600);
/// Unmatched jobs re-matched per pass, at most.
const REMATCH_BATCH: i64 = 1000;

/// What a pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Instances whose job completed, terminated this pass.
    pub terminated: usize,
    pub rematched: usize,
    pub requested: usize,
}

impl Reconciler {
    /// One reconcile pass over the ledger.
    pub async fn pass(&self) -> Result<PassReport, StoreError> {
        let started = tokio::time::Instant::now();
        let result = self.pass_inner().await;
        self.metrics
            .pass(started.elapsed().as_secs_f64(), result.is_ok());
        result
    }

    async fn pass_inner(&self) -> Result<PassReport, StoreError> {
        let mut report = PassReport {
            terminated: self.finish_completed().await?,
            ..PassReport::default()
        };
        // Webhooks wake a pass each; re-matching need not follow every one.
        if self.rematches.due(self.clock.now()) {
            report.rematched = self.rematch().await?;
        }
        let profiles = self.profiles.get();
        let cap = self.max_instances;
        let now = self.clock.now();
        // A profile backed off gets no runners: each would be registered
        // at GitHub only to fail the same way.
        let planned: Vec<Profile> = {
            let mut backoffs = lock(&self.backoffs);
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
            self.metrics.requested(&r.profile, 1);
            tracing::info!(runner = %r.name, profile = %r.profile, scope = %r.scope, "runner requested");
        }
        if !created.is_empty() {
            self.provision_wake.notify_one();
        }
        if self.gauges.due(self.clock.now()) {
            self.gauge_wake.notify_one();
        }
        Ok(report)
    }

    /// Jobs that arrived before a fitting profile existed.
    async fn rematch(&self) -> Result<usize, StoreError> {
        let mut rematched = 0;
        for (id, labels, repository) in self.store.unmatched_open_jobs(REMATCH_BATCH).await? {
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
            self.metrics.reaped(&r.profile, "completed");
            if let Some(at) = completed_at {
                let secs = (now - *at).num_milliseconds().max(0) as f64 / 1000.0;
                self.metrics.terminate_latency(&r.profile, secs);
            }
            tracing::info!(runner = %r.name, instance = ?r.instance_id, job_id = ?r.job_id, "job completed; instance terminated");
        }
        Ok(done.len())
    }

    /// Refreshes the gauges whenever a pass finds them due, until `stop`.
    /// Counting 10,000 runners and jobs takes the database tens of ms: a
    /// pass per webhook must not wait for it.
    pub(crate) async fn gauge_loop(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = self.gauge_wake.notified() => {}
            }
            if let Err(e) = self.refresh_gauges().await {
                tracing::warn!(error = %e, "refreshing the gauges failed");
            }
        }
    }

    async fn refresh_gauges(&self) -> Result<(), StoreError> {
        let counts = self
            .store
            .fleet_counts(self.controller_id.as_str(), ENDED_GAUGE_WINDOW)
            .await?;
        let demand = self.store.demand().await?;
        self.metrics
            .queued(&demand, &self.profiles.get().profiles, self.clock.now());
        let mut fleet = Fleet::default();
        for c in counts {
            let n = i64::try_from(c.runners).unwrap_or(i64::MAX);
            *fleet
                .runners
                .entry((c.profile.clone(), c.state))
                .or_default() += n;
            if c.state.is_live() && c.with_instance {
                let market = c.market.unwrap_or_else(|| "spot".into());
                *fleet.instances.entry((c.profile, market)).or_default() += n;
            }
        }
        self.metrics.fleet(&fleet);
        Ok(())
    }
}
