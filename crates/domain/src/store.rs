//! The ledger as a port: the [`Store`] trait the reconciler, the webhook
//! intake and the CLI are written against, with its records and its error.
//! `spot-runners-store` implements it on PostgreSQL; the simulator and the
//! tests use an in-memory implementation (`spot_runners_sim::MemoryStore`).
//! One contract suite runs against both.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::planner::{Demand, Launch, RunnerCount};
use crate::ports::RunnerScope;
use crate::profile::ProfileRow;
use crate::stale::StaleCutoffs;
use crate::{JobStatus, RunnerState, WorkflowJobEvent};

/// Why the ledger could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the database did not answer in time")]
    Timeout,
    #[error("ledger holds an invalid value: {0}")]
    Corrupt(String),
    /// The backend failed (connection, query, transaction).
    #[error("database: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

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
        deadline: std::time::Instant,
    ) -> Result<Vec<DeliveryOutcome>, StoreError>;

    /// Every `instance_profiles` row, valid or not.
    async fn profile_rows(&self) -> Result<Vec<ProfileRow>, StoreError>;

    /// Jobs per profile and status: all open jobs, and those completed
    /// within `completed_within`.
    async fn job_counts(&self, completed_within: Duration) -> Result<Vec<JobCount>, StoreError>;

    /// Forgets delivery GUIDs older than `retention`; returns how many.
    async fn prune_deliveries(&self, retention: Duration) -> Result<u64, StoreError>;

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
}

/// A job queued long enough that a lost webhook is worth ruling out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleJob {
    pub id: i64,
    /// `owner/repo`
    pub repository: String,
    pub profile: Option<String>,
    pub first_seen_at: DateTime<Utc>,
}

/// What GitHub's jobs API says about a job the ledger has as queued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobCheck {
    /// Still waiting for a runner: the planner keeps covering it.
    Queued,
    /// A runner took it; the `in_progress` delivery was lost.
    Started { runner_name: Option<String> },
    /// Finished or cancelled; the `completed` delivery was lost.
    Finished {
        conclusion: Option<String>,
        runner_name: Option<String>,
    },
    /// GitHub no longer knows it (the repository or run was deleted).
    Gone,
}

impl JobCheck {
    /// The label value in `spot_runners_stale_jobs_total{outcome}`.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobCheck::Queued => "still_queued",
            JobCheck::Started { .. } => "started",
            JobCheck::Finished { .. } => "finished",
            JobCheck::Gone => "gone",
        }
    }
}

/// One row of the jobs ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRecord {
    pub id: i64,
    pub name: String,
    pub workflow_name: Option<String>,
    pub repository: String,
    pub org: Option<String>,
    pub labels: Vec<String>,
    pub status: JobStatus,
    pub conclusion: Option<String>,
    pub runner_name: Option<String>,
    pub profile: Option<String>,
    pub match_error: Option<String>,
    pub html_url: Option<String>,
    pub first_seen_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub in_progress_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub checked_at: Option<DateTime<Utc>>,
}

/// A repository jobs came from, and where its runners register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentRepository {
    /// `owner/repo`
    pub repository: String,
    pub owner: String,
    pub org: Option<String>,
    pub installation_id: Option<i64>,
}

/// A runner row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerRecord {
    pub name: String,
    pub profile: String,
    pub state: RunnerState,
    pub scope: RunnerScope,
    pub github_runner_id: Option<i64>,
    pub instance_id: Option<String>,
    pub instance_type: Option<String>,
    pub subnet_id: Option<String>,
    pub market: Option<String>,
    pub job_id: Option<i64>,
    pub launch_attempts: i32,
    pub last_error_code: Option<String>,
    pub reason: Option<String>,
    pub demand_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub launched_at: Option<DateTime<Utc>>,
    /// First seen online (GitHub's runner list, or an `in_progress` naming it).
    pub online_at: Option<DateTime<Utc>>,
    /// Last transition.
    pub updated_at: DateTime<Utc>,
}

/// What the planner sees, read in the same transaction it writes in.
#[derive(Clone, Debug, Default)]
pub struct PlanSnapshot {
    pub demand: BTreeMap<String, Demand>,
    pub runners: Vec<RunnerCount>,
}

/// A transition of a runner row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunnerChange {
    /// GitHub issued the JIT config.
    Registered { github_runner_id: i64 },
    /// About to call `RunInstances` with these parameters.
    Launching {
        instance_type: String,
        subnet_id: Option<String>,
        market: String,
    },
    /// One attempt failed; the walk goes on.
    AttemptFailed { code: String, message: String },
    /// The instance exists.
    Booting {
        instance_id: String,
        instance_type: String,
        subnet_id: Option<String>,
        market: String,
    },
    /// Given up: a final state with its reason.
    Ended {
        state: RunnerState,
        code: Option<String>,
        reason: String,
    },
    /// Start over from `requested` (the JIT config was lost in a crash).
    Requeue,
    /// Not now (rate limited, GitHub down): any replica may claim it again
    /// after this long.
    Postpone { retry_in: std::time::Duration },
}

/// The function the planner runs inside the store's transaction.
pub type PlanFn = Box<dyn FnOnce(&PlanSnapshot) -> Vec<Launch> + Send>;

/// How long a provisioning claim lasts before another pass may resume it.
/// Short, so a replica that dies (`kill -9`, a lost host) holds its rows
/// only briefly; a live one renews its claims well before they run out.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
