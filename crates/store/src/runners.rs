//! How runner rows map onto columns.

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

/// Where a runner for a job registers: its org when it has one, else its
/// repository.
pub(crate) fn job_scope(org: Option<String>, repository: String) -> RunnerScope {
    match org {
        Some(o) => RunnerScope::Org(o),
        None => RunnerScope::Repo(repository),
    }
}
