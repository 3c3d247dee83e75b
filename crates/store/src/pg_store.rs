//! [`PgStore`] as the domain's [`Store`]: each method runs its query
//! (`postgres.rs`) and turns a database error into the port's error.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use spot_runners_domain::planner::Demand;
use spot_runners_domain::ports::RunnerScope;
use spot_runners_domain::profile::ProfileRow;
use spot_runners_domain::run::WorkflowRunEvent;
use spot_runners_domain::stale::StaleCutoffs;
use spot_runners_domain::store::{
    DeliveryOutcome, FleetCount, IncomingDelivery, JobCheck, JobCount, JobRecord, JobSurvival,
    MarketFn, MarketQuery, PlanFn, Pruned, RecentRepository, RerunOutcome, RunAwaitingRerun,
    RunnerChange, RunnerRecord, StaleJob, Store, StoreError,
};
use spot_runners_domain::survival::{Interruption, RunJob};
use spot_runners_domain::Market;
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

    async fn update_runner(
        &self,
        name: &str,
        owner: &str,
        change: RunnerChange,
    ) -> Result<bool, StoreError> {
        Ok(self.pg_update_runner(name, owner, change).await?)
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

    async fn fleet_counts(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<FleetCount>, StoreError> {
        Ok(self.pg_fleet_counts(controller_id, ended_within).await?)
    }

    async fn settle_jobs(
        &self,
        controller_id: &str,
    ) -> Result<Vec<(RunnerRecord, Option<DateTime<Utc>>)>, StoreError> {
        Ok(self.pg_settle_jobs(controller_id).await?)
    }

    async fn mark_online(
        &self,
        controller_id: &str,
        names: &[String],
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        Ok(self.pg_mark_online(controller_id, names, at).await?)
    }

    async fn mark_busy(
        &self,
        controller_id: &str,
        names: &[String],
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        Ok(self.pg_mark_busy(controller_id, names, at).await?)
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

    async fn choose_runner_market(
        &self,
        controller_id: &str,
        runner_name: &str,
        profile: &str,
        query: MarketQuery,
        decide: MarketFn,
    ) -> Result<(Market, String), StoreError> {
        Ok(self
            .pg_choose_runner_market(controller_id, runner_name, profile, query, decide)
            .await?)
    }

    async fn interruptions_since(
        &self,
        controller_id: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        Ok(self.pg_interruptions_since(controller_id, since).await?)
    }

    async fn prices(&self) -> Result<Vec<spot_runners_domain::store::PriceRow>, StoreError> {
        Ok(crate::cost::prices(self.pool()).await?)
    }

    async fn record_spot_prices(&self, prices: &[(String, f64)]) -> Result<u64, StoreError> {
        Ok(crate::cost::record_spot_prices(self.pool(), prices).await?)
    }

    async fn usage(
        &self,
        controller_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<spot_runners_domain::cost::Usage>, StoreError> {
        Ok(crate::cost::usage(self.pool(), controller_id, from, to).await?)
    }

    async fn job_of_runner(&self, runner_name: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.pg_job_of_runner(runner_name).await?)
    }

    async fn job_survival(&self, job_id: i64) -> Result<Option<JobSurvival>, StoreError> {
        Ok(self.pg_job_survival(job_id).await?)
    }

    async fn known_deliveries(&self, guids: &[String]) -> Result<BTreeSet<String>, StoreError> {
        Ok(self.pg_known_deliveries(guids).await?)
    }

    async fn link_reruns(&self) -> Result<u64, StoreError> {
        Ok(self.pg_link_reruns().await?)
    }

    async fn mark_run_checked(
        &self,
        run_id: i64,
        repository: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        Ok(self.pg_mark_run_checked(run_id, repository, at).await?)
    }

    async fn prune_ledger(
        &self,
        controller_id: &str,
        older_than: Duration,
        batch: i64,
    ) -> Result<Pruned, StoreError> {
        Ok(self
            .pg_prune_ledger(controller_id, older_than, batch)
            .await?)
    }

    async fn record_interruption(&self, interruption: &Interruption) -> Result<bool, StoreError> {
        Ok(self.pg_record_interruption(interruption).await?)
    }

    async fn record_run_check(
        &self,
        run: &WorkflowRunEvent,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        Ok(self.pg_record_run_check(run, at).await?)
    }

    async fn record_workflow_run(
        &self,
        delivery_id: &str,
        run: &WorkflowRunEvent,
    ) -> Result<DeliveryOutcome, StoreError> {
        Ok(self.pg_record_workflow_run(delivery_id, run).await?)
    }

    async fn rerun_attempts(&self, job_id: i64) -> Result<i32, StoreError> {
        Ok(self.pg_rerun_attempts(job_id).await?)
    }

    async fn run_jobs(&self, run_id: i64) -> Result<Vec<RunJob>, StoreError> {
        Ok(self.pg_run_jobs(run_id).await?)
    }

    async fn runs_awaiting_reruns(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<RunAwaitingRerun>, StoreError> {
        Ok(self.pg_runs_awaiting_reruns(now, limit).await?)
    }

    async fn set_rerun_outcome(
        &self,
        job_ids: &[i64],
        outcome: &RerunOutcome,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        Ok(self.pg_set_rerun_outcome(job_ids, outcome, at).await?)
    }
}
