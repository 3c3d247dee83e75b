//! The jobs ledger as the reconciler and the operator's CLI read it.

use chrono::{DateTime, Utc};
use spot_runners_domain::JobStatus;

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
