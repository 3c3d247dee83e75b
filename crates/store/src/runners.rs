//! Runner rows: created by the planner under a lock, driven through their
//! lifecycle by the provisioner, which claims them with a lease.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use spot_runners_domain::planner::{Demand, Launch, QueuedJob, RunnerCount};
use spot_runners_domain::ports::RunnerScope;
use spot_runners_domain::RunnerState;

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

pub(crate) fn scope_of(org: Option<String>, repository: Option<String>) -> Option<RunnerScope> {
    match (org, repository) {
        (Some(o), _) => Some(RunnerScope::Org(o)),
        (None, Some(r)) => Some(RunnerScope::Repo(r)),
        (None, None) => None,
    }
}

pub(crate) fn scope_columns(scope: &RunnerScope) -> (Option<&str>, Option<&str>) {
    match scope {
        RunnerScope::Org(o) => (Some(o.as_str()), None),
        RunnerScope::Repo(r) => (None, Some(r.as_str())),
    }
}

/// The function the planner runs inside the store's transaction.
pub type PlanFn = Box<dyn FnOnce(&PlanSnapshot) -> Vec<Launch> + Send>;

/// How long a provisioning claim lasts before another pass may resume it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(300);

pub(crate) fn queued_job(
    since: DateTime<Utc>,
    org: Option<String>,
    repository: String,
) -> QueuedJob {
    QueuedJob {
        since,
        scope: match org {
            Some(o) => RunnerScope::Org(o),
            None => RunnerScope::Repo(repository),
        },
    }
}
