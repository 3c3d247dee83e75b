//! Workflow jobs as GitHub reports them in `workflow_job` webhooks.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::DomainError;

/// Where a job stands. The order is the order of its life: the ledger never
/// moves a job backwards, whatever order deliveries arrive in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobStatus {
    /// Waiting for an environment's approval: not demand yet.
    Waiting,
    Queued,
    InProgress,
    Completed,
}

impl JobStatus {
    pub const ALL: [JobStatus; 4] = [
        JobStatus::Waiting,
        JobStatus::Queued,
        JobStatus::InProgress,
        JobStatus::Completed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Waiting => "waiting",
            JobStatus::Queued => "queued",
            JobStatus::InProgress => "in_progress",
            JobStatus::Completed => "completed",
        }
    }

    pub fn parse(s: &str) -> Result<Self, DomainError> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| DomainError::UnknownJobStatus(s.to_owned()))
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parts of a `workflow_job` delivery the service keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkflowJobEvent {
    pub job_id: i64,
    pub run_id: i64,
    pub run_attempt: i32,
    pub status: JobStatus,
    pub name: String,
    pub workflow_name: Option<String>,
    pub labels: Vec<String>,
    pub conclusion: Option<String>,
    pub runner_id: Option<i64>,
    pub runner_name: Option<String>,
    pub repository: String,
    pub owner: String,
    /// `organization.login`; `None` for a user-owned repository, whose
    /// runners are registered at repository level.
    pub org: Option<String>,
    pub installation_id: Option<i64>,
    pub html_url: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
struct Payload {
    action: String,
    workflow_job: JobPayload,
    repository: RepositoryPayload,
    organization: Option<LoginPayload>,
    installation: Option<InstallationPayload>,
}

#[derive(Deserialize)]
struct JobPayload {
    id: i64,
    run_id: i64,
    #[serde(default = "one")]
    run_attempt: i32,
    #[serde(default)]
    name: String,
    workflow_name: Option<String>,
    labels: Vec<String>,
    conclusion: Option<String>,
    runner_id: Option<i64>,
    runner_name: Option<String>,
    html_url: Option<String>,
    created_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
}

fn one() -> i32 {
    1
}

#[derive(Deserialize)]
struct RepositoryPayload {
    full_name: String,
    owner: LoginPayload,
}

#[derive(Deserialize)]
struct LoginPayload {
    login: String,
}

#[derive(Deserialize)]
struct InstallationPayload {
    id: i64,
}

/// What a `workflow_job` body turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum ParsedWorkflowJob {
    Event(Box<WorkflowJobEvent>),
    /// Well formed, but an action the ledger has no use for.
    IgnoredAction(String),
}

impl WorkflowJobEvent {
    /// Parses a `workflow_job` body. The action names the transition (the
    /// job's `status` field lags behind it in some deliveries).
    pub fn parse(body: &[u8]) -> Result<ParsedWorkflowJob, DomainError> {
        let p: Payload = serde_json::from_slice(body)
            .map_err(|e| DomainError::MalformedPayload(e.to_string()))?;
        let status = match JobStatus::parse(&p.action) {
            Ok(s) => s,
            Err(_) => return Ok(ParsedWorkflowJob::IgnoredAction(p.action)),
        };
        let j = p.workflow_job;
        if p.repository.full_name.split('/').count() != 2 {
            return Err(DomainError::MalformedPayload(format!(
                "repository.full_name {:?} is not owner/name",
                p.repository.full_name
            )));
        }
        // GitHub reports "" for a runner not yet assigned in some deliveries.
        let runner_name = j.runner_name.filter(|n| !n.is_empty());
        Ok(ParsedWorkflowJob::Event(Box::new(WorkflowJobEvent {
            job_id: j.id,
            run_id: j.run_id,
            run_attempt: j.run_attempt,
            status,
            name: j.name,
            workflow_name: j.workflow_name,
            labels: j.labels,
            conclusion: j.conclusion,
            runner_id: j.runner_id.filter(|id| *id > 0),
            runner_name,
            repository: p.repository.full_name,
            owner: p.repository.owner.login,
            org: p.organization.map(|o| o.login),
            installation_id: p.installation.map(|i| i.id),
            html_url: j.html_url,
            created_at: j.created_at,
            started_at: j.started_at,
            completed_at: j.completed_at,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_order_is_lifecycle_order() {
        assert!(JobStatus::Waiting < JobStatus::Queued);
        assert!(JobStatus::Queued < JobStatus::InProgress);
        assert!(JobStatus::InProgress < JobStatus::Completed);
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Ok(s));
        }
    }

    #[test]
    fn rejects_bodies_without_the_job() {
        assert!(WorkflowJobEvent::parse(b"{}").is_err());
        assert!(WorkflowJobEvent::parse(b"not json").is_err());
        assert!(
            WorkflowJobEvent::parse(br#"{"action":"queued","workflow_job":{"id":"x"}}"#).is_err()
        );
    }
}
