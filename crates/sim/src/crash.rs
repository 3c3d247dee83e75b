//! Crash points: the reconciler's IO (store, EC2, GitHub) wrapped so that a
//! scenario can kill it between any two calls, inside a pass, a sweep or a
//! launch, and restart it on the same ledger.
//!
//! A crash is a process dying: from the crashing call on, every call of
//! that incarnation never returns (its tasks are frozen where they stand,
//! as a killed process's would be, and do nothing more). The simulator
//! then starts a new incarnation: a new store session (the dead one's
//! leadership lock goes with it), a new reconciler with fresh memory, and
//! leases that run out before its claims resume the dead one's rows.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrecy::SecretString;
use spot_runners_domain::planner::Demand;
use spot_runners_domain::ports::{
    Cloud, CloudError, GitHub, GitHubError, GitHubJob, GitHubRunner, HookDelivery, Installation,
    Instance, JitConfig, JitRequest, JobReport, LaunchRequest, ParameterStore, RunnerScope,
    StoredParameter, WebhookSource,
};
use spot_runners_domain::profile::ProfileRow;
use spot_runners_domain::ratelimit::TokenBucket;
use spot_runners_domain::run::WorkflowRunEvent;
use spot_runners_domain::stale::StaleCutoffs;
use spot_runners_domain::store::{
    DeliveryOutcome, FleetCount, IncomingDelivery, JobCheck, JobCount, JobRecord, JobSurvival,
    MarketFn, MarketQuery, PlanFn, Pruned, RecentRepository, RerunOutcome, RunAwaitingRerun,
    RunnerChange, RunnerRecord, StaleJob, Store, StoreError,
};
use spot_runners_domain::survival::{Interruption, RerunFailure, RunJob};
use spot_runners_domain::Market;
use spot_runners_domain::RunnerState;

/// When crashes happen: at the first IO call after a time drawn from an
/// exponential distribution (`per_hour`), seeded.
pub struct Crashes {
    per_hour: f64,
    rng: Mutex<StdRng>,
    next: Mutex<Option<Instant>>,
    /// The live incarnation; calls of older ones never return.
    incarnation: AtomicU64,
    crashed: AtomicU64,
}

impl Crashes {
    pub fn new(per_hour: f64, seed: u64) -> Arc<Self> {
        let me = Arc::new(Self {
            per_hour,
            rng: Mutex::new(StdRng::seed_from_u64(seed ^ 0x0c4a_54e5)),
            next: Mutex::new(None),
            incarnation: AtomicU64::new(0),
            crashed: AtomicU64::new(0),
        });
        me.schedule();
        me
    }

    fn schedule(&self) {
        let next = (self.per_hour > 0.0).then(|| {
            let u: f64 = crate::lock(&self.rng).gen_range(f64::MIN_POSITIVE..1.0);
            let secs = -u.ln() * 3600.0 / self.per_hour;
            crate::now() + Duration::from_secs_f64(secs.min(1e9))
        });
        *crate::lock(&self.next) = next;
    }

    /// A crash point for incarnation `n`.
    pub fn point(self: &Arc<Self>, n: u64) -> Point {
        Point {
            crashes: Arc::clone(self),
            incarnation: n,
        }
    }

    /// Whether the live incarnation has crashed and awaits a restart.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst) > self.incarnation.load(Ordering::SeqCst)
    }

    /// How many crashes so far.
    pub fn count(&self) -> u64 {
        self.crashed.load(Ordering::SeqCst)
    }

    /// Starts the next incarnation; returns its number.
    pub fn restart(&self) -> u64 {
        let n = self.crashed.load(Ordering::SeqCst);
        self.incarnation.store(n, Ordering::SeqCst);
        self.schedule();
        n
    }
}

/// One incarnation's gate before every IO call.
#[derive(Clone)]
pub struct Point {
    crashes: Arc<Crashes>,
    incarnation: u64,
}

impl Point {
    pub async fn reached(&self) {
        let c = &self.crashes;
        let dead = c.crashed.load(Ordering::SeqCst) > self.incarnation;
        let due = crate::lock(&c.next).is_some_and(|t| crate::now() >= t);
        if !dead && due && c.incarnation.load(Ordering::SeqCst) == self.incarnation {
            c.crashed.store(self.incarnation + 1, Ordering::SeqCst);
            *crate::lock(&c.next) = None;
            tracing::debug!(
                incarnation = self.incarnation,
                "the reconciler crashes here"
            );
        }
        if c.crashed.load(Ordering::SeqCst) > self.incarnation {
            std::future::pending::<()>().await;
        }
    }
}

/// The store of one incarnation.
pub struct CrashingStore<S> {
    pub inner: S,
    pub point: Point,
}

#[async_trait]
impl<S: Store> Store for CrashingStore<S> {
    async fn record_deliveries(
        &self,
        batch: &[IncomingDelivery],
        deadline: std::time::Instant,
    ) -> Result<Vec<DeliveryOutcome>, StoreError> {
        self.point.reached().await;
        self.inner.record_deliveries(batch, deadline).await
    }

    async fn profile_rows(&self) -> Result<Vec<ProfileRow>, StoreError> {
        self.point.reached().await;
        self.inner.profile_rows().await
    }

    async fn job_counts(&self, completed_within: Duration) -> Result<Vec<JobCount>, StoreError> {
        self.point.reached().await;
        self.inner.job_counts(completed_within).await
    }

    async fn prune_deliveries(&self, retention: Duration) -> Result<u64, StoreError> {
        self.point.reached().await;
        self.inner.prune_deliveries(retention).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.point.reached().await;
        self.inner.ping().await
    }

    async fn unmatched_open_jobs(
        &self,
        limit: i64,
    ) -> Result<Vec<(i64, Vec<String>, String)>, StoreError> {
        self.point.reached().await;
        self.inner.unmatched_open_jobs(limit).await
    }

    async fn set_job_profile(
        &self,
        job_id: i64,
        profile: Result<&str, &str>,
    ) -> Result<(), StoreError> {
        self.point.reached().await;
        self.inner.set_job_profile(job_id, profile).await
    }

    async fn plan_runners(
        &self,
        controller_id: &str,
        plan: PlanFn,
    ) -> Result<Vec<RunnerRecord>, StoreError> {
        self.point.reached().await;
        self.inner.plan_runners(controller_id, plan).await
    }

    async fn claim_provisioning(
        &self,
        controller_id: &str,
        owner: &str,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<RunnerRecord>, StoreError> {
        self.point.reached().await;
        self.inner
            .claim_provisioning(controller_id, owner, lease, limit)
            .await
    }

    async fn renew_leases(
        &self,
        names: &[String],
        owner: &str,
        lease: Duration,
    ) -> Result<u64, StoreError> {
        self.point.reached().await;
        self.inner.renew_leases(names, owner, lease).await
    }

    async fn update_runner(
        &self,
        name: &str,
        owner: &str,
        change: RunnerChange,
    ) -> Result<bool, StoreError> {
        self.point.reached().await;
        self.inner.update_runner(name, owner, change).await
    }

    async fn runner_scopes(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<RunnerScope>, StoreError> {
        self.point.reached().await;
        self.inner.runner_scopes(controller_id, ended_within).await
    }

    async fn runners(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<RunnerRecord>, StoreError> {
        self.point.reached().await;
        self.inner.runners(controller_id, ended_within).await
    }

    async fn fleet_counts(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<FleetCount>, StoreError> {
        self.point.reached().await;
        self.inner.fleet_counts(controller_id, ended_within).await
    }

    async fn settle_jobs(
        &self,
        controller_id: &str,
    ) -> Result<Vec<(RunnerRecord, Option<DateTime<Utc>>)>, StoreError> {
        self.point.reached().await;
        self.inner.settle_jobs(controller_id).await
    }

    async fn mark_online(
        &self,
        controller_id: &str,
        names: &[String],
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        self.point.reached().await;
        self.inner.mark_online(controller_id, names, at).await
    }

    async fn mark_busy(
        &self,
        controller_id: &str,
        names: &[String],
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        self.point.reached().await;
        self.inner.mark_busy(controller_id, names, at).await
    }

    async fn end_runner_if(
        &self,
        name: &str,
        expected: RunnerState,
        state: RunnerState,
        reason: &str,
    ) -> Result<bool, StoreError> {
        self.point.reached().await;
        self.inner
            .end_runner_if(name, expected, state, reason)
            .await
    }

    async fn runner_states(
        &self,
        controller_id: &str,
        names: &[String],
    ) -> Result<BTreeMap<String, RunnerState>, StoreError> {
        self.point.reached().await;
        self.inner.runner_states(controller_id, names).await
    }

    async fn demand(&self) -> Result<BTreeMap<String, Demand>, StoreError> {
        self.point.reached().await;
        self.inner.demand().await
    }

    async fn stale_jobs(
        &self,
        cutoffs: &StaleCutoffs,
        idle_profiles: &[String],
        limit: i64,
    ) -> Result<Vec<StaleJob>, StoreError> {
        self.point.reached().await;
        self.inner.stale_jobs(cutoffs, idle_profiles, limit).await
    }

    async fn record_job_check(
        &self,
        job_id: i64,
        check: &JobCheck,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.point.reached().await;
        self.inner.record_job_check(job_id, check, at).await
    }

    async fn try_lead(&self, controller_id: &str) -> Result<bool, StoreError> {
        self.point.reached().await;
        self.inner.try_lead(controller_id).await
    }

    async fn recent_repositories(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<RecentRepository>, StoreError> {
        self.point.reached().await;
        self.inner.recent_repositories(since).await
    }

    async fn known_jobs(&self, ids: &[i64]) -> Result<BTreeSet<i64>, StoreError> {
        self.point.reached().await;
        self.inner.known_jobs(ids).await
    }

    async fn job(&self, job_id: i64) -> Result<Option<JobRecord>, StoreError> {
        self.point.reached().await;
        self.inner.job(job_id).await
    }

    async fn notify_wake(&self) -> Result<(), StoreError> {
        self.point.reached().await;
        self.inner.notify_wake().await
    }

    async fn prune_ledger(
        &self,
        controller_id: &str,
        older_than: Duration,
        batch: i64,
    ) -> Result<Pruned, StoreError> {
        self.point.reached().await;
        self.inner
            .prune_ledger(controller_id, older_than, batch)
            .await
    }

    async fn known_deliveries(&self, guids: &[String]) -> Result<BTreeSet<String>, StoreError> {
        self.point.reached().await;
        self.inner.known_deliveries(guids).await
    }

    async fn record_workflow_run(
        &self,
        delivery_id: &str,
        run: &WorkflowRunEvent,
    ) -> Result<DeliveryOutcome, StoreError> {
        self.point.reached().await;
        self.inner.record_workflow_run(delivery_id, run).await
    }

    async fn record_run_check(
        &self,
        run: &WorkflowRunEvent,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.point.reached().await;
        self.inner.record_run_check(run, at).await
    }

    async fn mark_run_checked(
        &self,
        run_id: i64,
        repository: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.point.reached().await;
        self.inner.mark_run_checked(run_id, repository, at).await
    }

    async fn record_interruption(&self, interruption: &Interruption) -> Result<bool, StoreError> {
        self.point.reached().await;
        self.inner.record_interruption(interruption).await
    }

    async fn job_of_runner(&self, runner_name: &str) -> Result<Option<i64>, StoreError> {
        self.point.reached().await;
        self.inner.job_of_runner(runner_name).await
    }

    async fn link_reruns(&self) -> Result<u64, StoreError> {
        self.point.reached().await;
        self.inner.link_reruns().await
    }

    async fn runs_awaiting_reruns(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<RunAwaitingRerun>, StoreError> {
        self.point.reached().await;
        self.inner.runs_awaiting_reruns(now, limit).await
    }

    async fn run_jobs(&self, run_id: i64) -> Result<Vec<RunJob>, StoreError> {
        self.point.reached().await;
        self.inner.run_jobs(run_id).await
    }

    async fn set_rerun_outcome(
        &self,
        job_ids: &[i64],
        outcome: &RerunOutcome,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.point.reached().await;
        self.inner.set_rerun_outcome(job_ids, outcome, at).await
    }

    async fn rerun_attempts(&self, job_id: i64) -> Result<i32, StoreError> {
        self.point.reached().await;
        self.inner.rerun_attempts(job_id).await
    }

    async fn job_survival(&self, job_id: i64) -> Result<Option<JobSurvival>, StoreError> {
        self.point.reached().await;
        self.inner.job_survival(job_id).await
    }

    async fn choose_runner_market(
        &self,
        controller_id: &str,
        runner_name: &str,
        profile: &str,
        query: MarketQuery,
        decide: MarketFn,
    ) -> Result<(Market, String), StoreError> {
        self.point.reached().await;
        self.inner
            .choose_runner_market(controller_id, runner_name, profile, query, decide)
            .await
    }

    async fn interruptions_since(
        &self,
        controller_id: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        self.point.reached().await;
        self.inner.interruptions_since(controller_id, since).await
    }

    async fn prices(&self) -> Result<Vec<spot_runners_domain::store::PriceRow>, StoreError> {
        self.point.reached().await;
        self.inner.prices().await
    }

    async fn record_spot_prices(&self, prices: &[(String, f64)]) -> Result<u64, StoreError> {
        self.point.reached().await;
        self.inner.record_spot_prices(prices).await
    }

    async fn usage(
        &self,
        controller_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<spot_runners_domain::cost::Usage>, StoreError> {
        self.point.reached().await;
        self.inner.usage(controller_id, from, to).await
    }
}

/// EC2 of one incarnation.
pub struct CrashingCloud<C> {
    pub inner: C,
    pub point: Point,
}

#[async_trait]
impl<C: Cloud> Cloud for CrashingCloud<C> {
    async fn launch(&self, request: &LaunchRequest) -> Result<Instance, CloudError> {
        self.point.reached().await;
        self.inner.launch(request).await
    }

    async fn terminate(&self, instance_ids: &[String]) -> Result<(), CloudError> {
        self.point.reached().await;
        self.inner.terminate(instance_ids).await
    }

    async fn list_owned(&self, controller_id: &str) -> Result<Vec<Instance>, CloudError> {
        self.point.reached().await;
        self.inner.list_owned(controller_id).await
    }

    async fn tag_instance(
        &self,
        instance_id: &str,
        tags: &[(&str, String)],
    ) -> Result<(), CloudError> {
        self.point.reached().await;
        self.inner.tag_instance(instance_id, tags).await
    }

    fn launch_limit(&self) -> TokenBucket {
        self.inner.launch_limit()
    }
}

/// GitHub of one incarnation.
pub struct CrashingGitHub<G> {
    pub inner: G,
    pub point: Point,
}

#[async_trait]
impl<G: GitHub> GitHub for CrashingGitHub<G> {
    async fn generate_jit_config(
        &self,
        scope: &RunnerScope,
        request: &JitRequest,
    ) -> Result<JitConfig, GitHubError> {
        self.point.reached().await;
        self.inner.generate_jit_config(scope, request).await
    }

    async fn list_runners(&self, scope: &RunnerScope) -> Result<Vec<GitHubRunner>, GitHubError> {
        self.point.reached().await;
        self.inner.list_runners(scope).await
    }

    async fn delete_runner(&self, scope: &RunnerScope, runner_id: i64) -> Result<(), GitHubError> {
        self.point.reached().await;
        self.inner.delete_runner(scope, runner_id).await
    }

    async fn job(&self, repository: &str, job_id: i64) -> Result<JobReport, GitHubError> {
        self.point.reached().await;
        self.inner.job(repository, job_id).await
    }

    async fn queued_jobs(&self, repository: &str) -> Result<Vec<GitHubJob>, GitHubError> {
        self.point.reached().await;
        self.inner.queued_jobs(repository).await
    }

    async fn installations(&self) -> Result<Vec<Installation>, GitHubError> {
        self.point.reached().await;
        self.inner.installations().await
    }

    async fn hook_deliveries(
        &self,
        source: &WebhookSource,
        since: DateTime<Utc>,
    ) -> Result<Vec<HookDelivery>, GitHubError> {
        self.point.reached().await;
        self.inner.hook_deliveries(source, since).await
    }

    async fn redeliver(&self, source: &WebhookSource, delivery_id: i64) -> Result<(), GitHubError> {
        self.point.reached().await;
        self.inner.redeliver(source, delivery_id).await
    }

    async fn workflow_run(
        &self,
        repository: &str,
        run_id: i64,
    ) -> Result<WorkflowRunEvent, GitHubError> {
        self.point.reached().await;
        self.inner.workflow_run(repository, run_id).await
    }

    async fn rerun_job(&self, repository: &str, job_id: i64) -> Result<(), RerunFailure> {
        self.point.reached().await;
        self.inner.rerun_job(repository, job_id).await
    }

    async fn rerun_failed_jobs(&self, repository: &str, run_id: i64) -> Result<(), RerunFailure> {
        self.point.reached().await;
        self.inner.rerun_failed_jobs(repository, run_id).await
    }

    fn jit_config_limit(&self) -> TokenBucket {
        self.inner.jit_config_limit()
    }
}

/// SSM Parameter Store of one incarnation.
pub struct CrashingParameters<P> {
    pub inner: P,
    pub point: Point,
}

#[async_trait]
impl<P: ParameterStore> ParameterStore for CrashingParameters<P> {
    async fn create_secure(&self, name: &str, value: &SecretString) -> Result<(), CloudError> {
        self.point.reached().await;
        self.inner.create_secure(name, value).await
    }

    async fn tag(&self, name: &str, tags: &[(&str, String)]) -> Result<(), CloudError> {
        self.point.reached().await;
        self.inner.tag(name, tags).await
    }

    async fn delete(&self, name: &str) -> Result<(), CloudError> {
        self.point.reached().await;
        self.inner.delete(name).await
    }

    async fn list(&self, path: &str) -> Result<Vec<StoredParameter>, CloudError> {
        self.point.reached().await;
        self.inner.list(path).await
    }
}
