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
use crate::run::WorkflowRunEvent;
use crate::stale::StaleCutoffs;
use crate::survival::{Interruption, QueuedJobFacts, RunJob};
use crate::Market;
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

/// What one retention batch deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    pub runners: u64,
}

/// A workflow run with an interrupted job whose re-run is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAwaitingRerun {
    pub run_id: i64,
    pub repository: String,
    pub profile: Option<String>,
    /// What the ledger knows of the run: `None` when nothing yet.
    pub status: Option<String>,
    pub checked_at: Option<DateTime<Utc>>,
}

impl RunAwaitingRerun {
    pub fn completed(&self) -> bool {
        self.status.as_deref() == Some("completed")
    }
}

/// What became of a re-run request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RerunOutcome {
    /// GitHub accepted it: a new attempt of the run is starting.
    Requested,
    /// Not now; due again at `at`. The reason is what `jobs explain` says.
    RetryAt { at: DateTime<Utc>, reason: String },
    /// Given up: the job is lost.
    Lost { reason: String },
    /// Nothing to re-run: GitHub reports the job finished well (the
    /// reclaim came after it, or another runner ran it). Terminal, and not
    /// a loss.
    NotNeeded { reason: String },
    /// Left for a later completion of the run (another job's re-run goes first).
    Waiting { reason: String },
}

/// The market decision's view of one profile.
#[derive(Clone, Debug, Default)]
pub struct MarketSnapshot {
    pub queued: Vec<QueuedJobFacts>,
    /// `None` on the first ask; counted under the per-profile lock only
    /// when the decision asks for it.
    pub on_demand_available: Option<usize>,
    /// When the profile's instances were reclaimed lately.
    pub interruptions: Vec<DateTime<Utc>>,
}

/// Which facts a market decision reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarketQuery {
    /// Reclaims of the profile's instances since then (the breaker).
    pub interruptions_since: DateTime<Utc>,
    /// Only the queued jobs that may want on-demand are read: re-runs
    /// (`run_attempt` > 1) always, every queued job with its duration
    /// history only when this is set (the profile has
    /// `spot_max_job_minutes`). The others cannot change the decision, and
    /// reading them would make each launch cost as much as the queue is long.
    pub with_durations: bool,
}

/// Decides a runner's market. The store asks first without the on-demand
/// count; an answer of `None` means the count matters, and the store asks
/// again with it, under a per-profile lock so that launches deciding at
/// once each see the on-demand runners the ones before chose. With the
/// count it must answer.
pub type MarketFn = Box<dyn Fn(&MarketSnapshot) -> Option<(Market, String)> + Send>;

/// The spot-survival part of a job, for `jobs explain`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobSurvival {
    pub interrupted_at: Option<DateTime<Utc>>,
    pub interrupted_runner: Option<String>,
    pub interrupted_instance_type: Option<String>,
    pub interrupted_subnet_id: Option<String>,
    pub interrupted_az: Option<String>,
    pub interrupted_market: Option<String>,
    pub interrupted_after_secs: Option<i32>,
    pub rerun_of: Option<i64>,
    pub rerun_count: i32,
    pub rerun_state: Option<String>,
    pub rerun_reason: Option<String>,
    pub rerun_attempts: i32,
    pub rerun_next_at: Option<DateTime<Utc>>,
    /// The market the runner that took it ran on, and why.
    pub runner_market: Option<String>,
    pub runner_market_reason: Option<String>,
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

    /// Applies a provisioning transition, compare-and-set: only while
    /// `owner` holds the row's lease and the row is still being provisioned
    /// (`requested`, `registered`, `launching`). `Booting` also records the
    /// instance of a row that `settle_jobs` or a listing moved to `busy` or
    /// `done` before its instance id was written (its state stays), so that
    /// row can still be ended. Ending a row also drops its lease. Returns
    /// `false` when the row moved on (a sweep ended it, another replica
    /// claimed it after this lease lapsed): the caller must leave it alone.
    async fn update_runner(
        &self,
        name: &str,
        owner: &str,
        change: RunnerChange,
    ) -> Result<bool, StoreError>;

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

    /// Runners counted by profile, state, market and whether they have an
    /// instance: the live ones and those that ended within `ended_within`
    /// (the fleet gauges).
    async fn fleet_counts(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<FleetCount>, StoreError>;

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
    async fn mark_online(
        &self,
        controller_id: &str,
        names: &[String],
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// GitHub lists these runners busy: `launching`/`booting`/`idle` →
    /// `busy` (with no job if no `in_progress` named it). Returns how many changed.
    async fn mark_busy(
        &self,
        controller_id: &str,
        names: &[String],
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

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
    /// queued jobs, on-demand runners available, interruptions; which ones
    /// [`MarketQuery`] says) and records it on the runner row.
    async fn choose_runner_market(
        &self,
        controller_id: &str,
        runner_name: &str,
        profile: &str,
        query: MarketQuery,
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
    /// or updated unless an operator pinned the row
    /// ([`PRICE_SOURCE_OPERATOR`]). Returns rows written.
    async fn record_spot_prices(&self, prices: &[(String, f64)]) -> Result<u64, StoreError>;

    /// Every runner of `controller_id` whose instance ran at some time in
    /// `[from, to)`, with the job it ran and whether a reclaim interrupted it.
    async fn usage(
        &self,
        controller_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<crate::cost::Usage>, StoreError>;
}

/// `source` of the spot prices refreshed from `DescribeSpotPriceHistory`.
pub const PRICE_SOURCE_EC2: &str = "ec2";
/// `source` of a price an operator pinned: a refresh never overwrites it.
pub const PRICE_SOURCE_OPERATOR: &str = "operator";

/// An `instance_prices` row.
#[derive(Clone, Debug, PartialEq)]
pub struct PriceRow {
    pub instance_type: String,
    pub market: String,
    pub dollars_per_hour: f64,
    pub source: String,
    pub updated_at: DateTime<Utc>,
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
    /// While it is queued for a profile: its place in that profile's queue
    /// (1 = the oldest).
    pub queue_position: Option<usize>,
}

/// A repository jobs came from, and where its runners register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentRepository {
    /// `owner/repo`
    pub repository: String,
    pub owner: String,
    pub org: Option<String>,
    pub installation_id: Option<i64>,
    /// When the newest of its jobs was first seen.
    pub last_job_seen_at: DateTime<Utc>,
    /// When the newest of its jobs that ran on a runner without the ledger
    /// ever seeing it queued was first seen: its `queued` delivery was
    /// lost, and siblings of it may be waiting unseen.
    pub unqueued_job_seen_at: Option<DateTime<Utc>>,
}

/// Runners of one profile, state and market, counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetCount {
    pub profile: String,
    pub state: RunnerState,
    pub market: Option<String>,
    /// Whether these runners have an instance.
    pub with_instance: bool,
    pub runners: usize,
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
