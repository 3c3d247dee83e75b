//! How runner rows map onto columns.

use chrono::{DateTime, Utc};
use spot_runners_domain::planner::QueuedJob;
use spot_runners_domain::ports::RunnerScope;

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
