//! [`PgStore`] as the domain's [`Store`]: each method runs its query
//! (`postgres.rs`) and turns a database error into the port's error.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use spot_runners_domain::planner::Demand;
use spot_runners_domain::ports::RunnerScope;
use spot_runners_domain::profile::ProfileRow;
use spot_runners_domain::stale::StaleCutoffs;
use spot_runners_domain::store::{
    DeliveryOutcome, IncomingDelivery, JobCheck, JobCount, JobRecord, PlanFn, RecentRepository,
    RunnerChange, RunnerRecord, StaleJob, Store, StoreError,
};
use spot_runners_domain::RunnerState;

use crate::PgStore;

#[async_trait]
impl Store for PgStore {
    async fn record_deliveries(
        &self,
        batch: &[IncomingDelivery],
        deadline: std::time::Instant,
    ) -> Result<Vec<DeliveryOutcome>, StoreError> {
        Ok(self
            .pg_record_deliveries(batch, tokio::time::Instant::from_std(deadline))
            .await?)
    }

    async fn profile_rows(&self) -> Result<Vec<ProfileRow>, StoreError> {
        Ok(self.pg_profile_rows().await?)
    }

    async fn job_counts(&self, completed_within: Duration) -> Result<Vec<JobCount>, StoreError> {
        Ok(self.pg_job_counts(completed_within).await?)
    }

    async fn prune_deliveries(&self, retention: Duration) -> Result<u64, StoreError> {
        Ok(self.pg_prune_deliveries(retention).await?)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.pg_ping().await?)
    }

    async fn unmatched_open_jobs(
        &self,
        limit: i64,
    ) -> Result<Vec<(i64, Vec<String>, String)>, StoreError> {
        Ok(self.pg_unmatched_open_jobs(limit).await?)
    }

    async fn set_job_profile(
        &self,
        job_id: i64,
        profile: Result<&str, &str>,
    ) -> Result<(), StoreError> {
        Ok(self.pg_set_job_profile(job_id, profile).await?)
    }

    async fn plan_runners(
        &self,
        controller_id: &str,
        plan: PlanFn,
    ) -> Result<Vec<RunnerRecord>, StoreError> {
        Ok(self.pg_plan_runners(controller_id, plan).await?)
    }

    async fn claim_provisioning(
        &self,
        controller_id: &str,
        owner: &str,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<RunnerRecord>, StoreError> {
        Ok(self
            .pg_claim_provisioning(controller_id, owner, lease, limit)
            .await?)
    }

    async fn renew_leases(
        &self,
        names: &[String],
        owner: &str,
        lease: Duration,
    ) -> Result<u64, StoreError> {
        Ok(self.pg_renew_leases(names, owner, lease).await?)
    }

    async fn update_runner(&self, name: &str, change: RunnerChange) -> Result<(), StoreError> {
        Ok(self.pg_update_runner(name, change).await?)
    }

    async fn runner_scopes(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<RunnerScope>, StoreError> {
        Ok(self.pg_runner_scopes(controller_id, ended_within).await?)
    }

    async fn runners(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<RunnerRecord>, StoreError> {
        Ok(self.pg_runners(controller_id, ended_within).await?)
    }

    async fn settle_jobs(
        &self,
        controller_id: &str,
    ) -> Result<Vec<(RunnerRecord, Option<DateTime<Utc>>)>, StoreError> {
        Ok(self.pg_settle_jobs(controller_id).await?)
    }

    async fn mark_online(&self, names: &[String], at: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(self.pg_mark_online(names, at).await?)
    }

    async fn mark_busy(&self, names: &[String], at: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(self.pg_mark_busy(names, at).await?)
    }

    async fn end_runner_if(
        &self,
        name: &str,
        expected: RunnerState,
        state: RunnerState,
        reason: &str,
    ) -> Result<bool, StoreError> {
        Ok(self.pg_end_runner_if(name, expected, state, reason).await?)
    }

    async fn runner_states(
        &self,
        controller_id: &str,
        names: &[String],
    ) -> Result<BTreeMap<String, RunnerState>, StoreError> {
        Ok(self.pg_runner_states(controller_id, names).await?)
    }

    async fn demand(&self) -> Result<BTreeMap<String, Demand>, StoreError> {
        Ok(self.pg_demand().await?)
    }

    async fn stale_jobs(
        &self,
        cutoffs: &StaleCutoffs,
        idle_profiles: &[String],
        limit: i64,
    ) -> Result<Vec<StaleJob>, StoreError> {
        Ok(self.pg_stale_jobs(cutoffs, idle_profiles, limit).await?)
    }

    async fn record_job_check(
        &self,
        job_id: i64,
        check: &JobCheck,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        Ok(self.pg_record_job_check(job_id, check, at).await?)
    }

    async fn try_lead(&self, controller_id: &str) -> Result<bool, StoreError> {
        Ok(self.pg_try_lead(controller_id).await?)
    }

    async fn recent_repositories(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<RecentRepository>, StoreError> {
        Ok(self.pg_recent_repositories(since).await?)
    }

    async fn known_jobs(&self, ids: &[i64]) -> Result<BTreeSet<i64>, StoreError> {
        Ok(self.pg_known_jobs(ids).await?)
    }

    async fn job(&self, job_id: i64) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.pg_job(job_id).await?)
    }

    async fn notify_wake(&self) -> Result<(), StoreError> {
        Ok(self.pg_notify_wake().await?)
    }
}
