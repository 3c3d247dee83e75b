//! Persistence for spot-runners: the [`Store`] trait the service is written
//! against, its PostgreSQL implementation, and an embedded PostgreSQL for
//! running without a database server of one's own.

mod cost;
pub mod embedded;
mod error;
mod jobs;
mod postgres;
mod runners;
mod survival;
#[cfg(feature = "testing")]
pub mod testing;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use spot_runners_domain::planner::Demand;
use spot_runners_domain::ports::RunnerScope;
use spot_runners_domain::run::WorkflowRunEvent;
use spot_runners_domain::stale::StaleCutoffs;
use spot_runners_domain::survival::{Interruption, RunJob};
use spot_runners_domain::Market;
use spot_runners_domain::{profile::ProfileRow, JobStatus, RunnerState, WorkflowJobEvent};
use tokio::time::Instant;

pub use cost::{PriceRow, SOURCE_EC2, SOURCE_OPERATOR};
pub use error::StoreError;
pub use jobs::{JobCheck, JobRecord, RecentRepository, StaleJob};
pub use postgres::PgStore;
pub use runners::{PlanFn, PlanSnapshot, RunnerChange, RunnerRecord, DEFAULT_LEASE};
pub use survival::{JobSurvival, MarketFn, MarketSnapshot, RerunOutcome, RunAwaitingRerun};

/// A verified, parsed `workflow_job` delivery on its way into the ledger.
#[derive(Clone, Debug)]
pub struct IncomingDelivery {
    pub delivery_id: String,
    pub job: WorkflowJobEvent,
    /// The profile matched at arrival, or why none was.
    pub profile: Result<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Recorded; the ledger may or may not have changed (an older status
    /// than the job's current one changes nothing).
    Accepted,
    /// The delivery GUID was seen before; nothing changed.
    Duplicate,
}

/// Open and recent jobs per profile and status, for the jobs gauge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobCount {
    pub profile: Option<String>,
    pub status: JobStatus,
    pub count: i64,
}

/// What one retention batch deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    pub runners: u64,
}

/// What the service needs from its database.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a batch of deliveries in one transaction (one durable commit
    /// for all of them). Either every delivery is recorded or none is; a
    /// batch that cannot commit before `deadline` is rolled back, so a
    /// delivery answered "unavailable" is never recorded as seen.
    async fn record_deliveries(
        &self,
        batch: &[IncomingDelivery],
        deadline: Instant,
    ) -> Result<Vec<DeliveryOutcome>, StoreError>;

    /// Every `instance_profiles` row, valid or not.
    async fn profile_rows(&self) -> Result<Vec<ProfileRow>, StoreError>;

    /// Jobs per profile and status: all open jobs, and those completed
    /// within `completed_within`.
    async fn job_counts(&self, completed_within: Duration) -> Result<Vec<JobCount>, StoreError>;

    /// Forgets delivery GUIDs older than `retention`; returns how many.
    async fn prune_deliveries(&self, retention: Duration) -> Result<u64, StoreError>;

    /// Retention: deletes at most `batch` completed jobs and at most `batch`
    /// ended runners of `controller_id` that are older than `older_than`,
    /// oldest first. Open jobs and live runners are never touched.
    async fn prune_ledger(
        &self,
        controller_id: &str,
        older_than: Duration,
        batch: i64,
    ) -> Result<Pruned, StoreError>;

    /// Succeeds when the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Open jobs that matched no profile when they arrived: `(id, labels,
    /// repository)`, at most `limit`.
    async fn unmatched_open_jobs(
        &self,
        limit: i64,
    ) -> Result<Vec<(i64, Vec<String>, String)>, StoreError>;

    /// Records a (re)match for an open job.
    async fn set_job_profile(
        &self,
        job_id: i64,
        profile: Result<&str, &str>,
    ) -> Result<(), StoreError>;

    /// Runs `plan` on a consistent snapshot and writes the runner rows it
    /// asks for, all under one lock shared by every replica, so two
    /// replicas never plan the same demand twice. Returns the new rows
    /// (none when another replica holds the lock).
    async fn plan_runners(
        &self,
        controller_id: &str,
        plan: PlanFn,
    ) -> Result<Vec<RunnerRecord>, StoreError>;

    /// Claims up to `limit` rows that need provisioning (requested,
    /// registered, launching) and are not leased by anyone else.
    async fn claim_provisioning(
        &self,
        controller_id: &str,
        owner: &str,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<RunnerRecord>, StoreError>;

    /// Extends this owner's claims on these rows while it still works on
    /// them. Returns how many it still holds.
    async fn renew_leases(
        &self,
        names: &[String],
        owner: &str,
        lease: Duration,
    ) -> Result<u64, StoreError>;

    /// Applies a transition. Ending a row also drops its lease.
    async fn update_runner(&self, name: &str, change: RunnerChange) -> Result<(), StoreError>;

    /// Where live runners, and those that ended within `ended_within`, are
    /// registered.
    async fn runner_scopes(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<RunnerScope>, StoreError>;

    /// Runners in a live state, plus those that ended within `ended_within`.
    async fn runners(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<RunnerRecord>, StoreError>;

    /// Moves runners along with their jobs: `in_progress` names a runner →
    /// `busy`; its job `completed` → `done`. Then claims the `done` runners
    /// that have an instance by moving them to `terminating`, and returns
    /// them with their job's completion time: each is returned to exactly
    /// one caller, so two replicas never terminate the same instance.
    async fn settle_jobs(
        &self,
        controller_id: &str,
    ) -> Result<Vec<(RunnerRecord, Option<DateTime<Utc>>)>, StoreError>;

    /// GitHub lists these runners online: `launching`/`booting` → `idle`,
    /// first seen online `at`. Returns how many changed.
    async fn mark_online(&self, names: &[String], at: DateTime<Utc>) -> Result<u64, StoreError>;

    /// GitHub lists these runners busy: `launching`/`booting`/`idle` →
    /// `busy` (with no job if no `in_progress` named it). Returns how many changed.
    async fn mark_busy(&self, names: &[String], at: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Ends a runner only if it is still in `expected` (a reap must not
    /// race an `in_progress` that just made it busy). Returns whether it did.
    async fn end_runner_if(
        &self,
        name: &str,
        expected: RunnerState,
        state: RunnerState,
        reason: &str,
    ) -> Result<bool, StoreError>;

    /// The states of these runners, of any age; names the ledger has never
    /// seen are missing from the answer.
    async fn runner_states(
        &self,
        controller_id: &str,
        names: &[String],
    ) -> Result<BTreeMap<String, RunnerState>, StoreError>;

    /// Queued demand per profile, as the planner sees it.
    async fn demand(&self) -> Result<BTreeMap<String, Demand>, StoreError>;

    /// Jobs still `queued` that are due for a check by `cutoffs`
    /// ([`StaleCutoffs::due`]); `idle_profiles` have a runner online with
    /// nothing to do. Least recently checked first.
    async fn stale_jobs(
        &self,
        cutoffs: &StaleCutoffs,
        idle_profiles: &[String],
        limit: i64,
    ) -> Result<Vec<StaleJob>, StoreError>;

    /// What GitHub's jobs API said about a stale job. Status still only
    /// moves forward.
    async fn record_job_check(
        &self,
        job_id: i64,
        check: &JobCheck,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Whether this process leads the sweeps for `controller_id`: only one
    /// replica at a time does, and leadership passes on when its session
    /// ends (crash included).
    async fn try_lead(&self, controller_id: &str) -> Result<bool, StoreError>;

    /// Repositories with jobs first seen since `since`, with where their
    /// runners register: the places to look for jobs whose `queued`
    /// delivery was lost.
    async fn recent_repositories(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<RecentRepository>, StoreError>;

    /// Which of these job ids the ledger holds.
    async fn known_jobs(&self, ids: &[i64]) -> Result<BTreeSet<i64>, StoreError>;

    /// One job as the ledger holds it.
    async fn job(&self, job_id: i64) -> Result<Option<JobRecord>, StoreError>;

    /// Wakes every replica's reconciler.
    async fn notify_wake(&self) -> Result<(), StoreError>;

    /// Which of these delivery GUIDs the ledger holds (recorded and not yet
    /// pruned).
    async fn known_deliveries(&self, guids: &[String]) -> Result<BTreeSet<String>, StoreError>;
    // ------------------------------------------------ spot survival --

    /// Records a `workflow_run` `completed` delivery (deduplicated by GUID).
    async fn record_workflow_run(
        &self,
        delivery_id: &str,
        run: &WorkflowRunEvent,
    ) -> Result<DeliveryOutcome, StoreError>;

    /// What GitHub's runs API said about a run, asked `at`.
    async fn record_run_check(
        &self,
        run: &WorkflowRunEvent,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// The runs API was asked about a run `at` and did not answer usefully.
    async fn mark_run_checked(
        &self,
        run_id: i64,
        repository: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Marks a job interrupted by a spot reclaim, its re-run pending.
    /// Returns whether it was not marked before.
    async fn record_interruption(&self, interruption: &Interruption) -> Result<bool, StoreError>;

    /// The job GitHub gave this runner, by the ledger's `runner_name`
    /// (a runner GitHub listed busy before its `in_progress` arrived has
    /// no `job_id` yet).
    async fn job_of_runner(&self, runner_name: &str) -> Result<Option<i64>, StoreError>;

    /// Links jobs of later attempts to the interrupted jobs they re-run.
    async fn link_reruns(&self) -> Result<u64, StoreError>;

    /// Runs with an interrupted job whose re-run is due at `now`.
    async fn runs_awaiting_reruns(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<RunAwaitingRerun>, StoreError>;

    /// The jobs of a run's latest attempt (one per job name).
    async fn run_jobs(&self, run_id: i64) -> Result<Vec<RunJob>, StoreError>;

    /// Records what became of the re-run of these pending jobs.
    async fn set_rerun_outcome(
        &self,
        job_ids: &[i64],
        outcome: &RerunOutcome,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Re-run requests made for this job so far.
    async fn rerun_attempts(&self, job_id: i64) -> Result<i32, StoreError>;

    /// A job's interruption and re-run record, for `jobs explain`.
    async fn job_survival(&self, job_id: i64) -> Result<Option<JobSurvival>, StoreError>;

    /// Decides a runner's market by `decide` on the profile's facts (its
    /// queued jobs, on-demand runners available, interruptions since
    /// `interruptions_since`) and records it on the runner row.
    async fn choose_runner_market(
        &self,
        controller_id: &str,
        runner_name: &str,
        profile: &str,
        interruptions_since: DateTime<Utc>,
        decide: MarketFn,
    ) -> Result<(Market, String), StoreError>;

    /// `(profile, when)` of every instance reclaim since `since`.
    async fn interruptions_since(
        &self,
        controller_id: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError>;
    // ------------------------------------------------------------ cost --

    /// Every `instance_prices` row.
    async fn prices(&self) -> Result<Vec<PriceRow>, StoreError>;

    /// Spot prices `(instance type, dollars per hour)` from EC2: inserted,
    /// or updated unless an operator pinned the row. Returns rows written.
    async fn record_spot_prices(&self, prices: &[(String, f64)]) -> Result<u64, StoreError>;

    /// Every runner of `controller_id` whose instance ran at some time in
    /// `[from, to)`, with the job it ran and whether a reclaim interrupted it.
    async fn usage(
        &self,
        controller_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<spot_runners_domain::cost::Usage>, StoreError>;
}
