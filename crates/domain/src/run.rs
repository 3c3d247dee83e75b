//! Workflow runs as `workflow_run` webhooks and the runs API report them:
//! a re-run of an interrupted job waits for its run to complete.

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::DomainError;

/// The parts of a workflow run the re-run worker needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkflowRunEvent {
    pub run_id: i64,
    pub run_attempt: i32,
    /// `owner/name`
    pub repository: String,
    /// `queued`, `in_progress`, `completed`, …
    pub status: String,
    pub conclusion: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl WorkflowRunEvent {
    pub fn is_completed(&self) -> bool {
        self.status == "completed"
    }
}

#[derive(Deserialize)]
struct Payload {
    action: String,
    workflow_run: RunPayload,
    repository: Repository,
}

/// Also the body of `GET /repos/{owner}/{repo}/actions/runs/{run_id}`.
#[derive(Deserialize)]
pub struct RunPayload {
    id: i64,
    #[serde(default = "one")]
    run_attempt: i32,
    status: Option<String>,
    conclusion: Option<String>,
    updated_at: Option<DateTime<Utc>>,
    repository: Option<Repository>,
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
}

fn one() -> i32 {
    1
}

/// What a `workflow_run` body turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum ParsedWorkflowRun {
    Completed(WorkflowRunEvent),
    /// Well formed; `requested` and `in_progress` change nothing for us.
    IgnoredAction(String),
}

fn owner_name(full_name: &str) -> Result<(), DomainError> {
    let mut parts = full_name.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(o), Some(n), None) if !o.is_empty() && !n.is_empty() => Ok(()),
        _ => Err(DomainError::MalformedPayload(format!(
            "repository.full_name {full_name:?} is not owner/name"
        ))),
    }
}

impl WorkflowRunEvent {
    /// Parses a `workflow_run` delivery. The action names the transition:
    /// `completed` means completed, whatever the body's `status` lags at.
    pub fn parse(body: &[u8]) -> Result<ParsedWorkflowRun, DomainError> {
        let p: Payload = serde_json::from_slice(body)
            .map_err(|e| DomainError::MalformedPayload(e.to_string()))?;
        if p.action != "completed" {
            return Ok(ParsedWorkflowRun::IgnoredAction(p.action));
        }
        owner_name(&p.repository.full_name)?;
        let r = p.workflow_run;
        Ok(ParsedWorkflowRun::Completed(WorkflowRunEvent {
            run_id: r.id,
            run_attempt: r.run_attempt,
            repository: p.repository.full_name,
            status: "completed".to_owned(),
            conclusion: r.conclusion,
            updated_at: r.updated_at,
        }))
    }

    /// Parses the runs API's answer for a run of `repository`.
    pub fn from_api(repository: &str, body: &[u8]) -> Result<Self, DomainError> {
        let r: RunPayload = serde_json::from_slice(body)
            .map_err(|e| DomainError::MalformedPayload(e.to_string()))?;
        Ok(WorkflowRunEvent {
            run_id: r.id,
            run_attempt: r.run_attempt,
            repository: r
                .repository
                .map_or_else(|| repository.to_owned(), |x| x.full_name),
            status: r.status.ok_or_else(|| {
                DomainError::MalformedPayload("workflow run without status".into())
            })?,
            conclusion: r.conclusion,
            updated_at: r.updated_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bodies_without_the_run() {
        assert!(WorkflowRunEvent::parse(b"{}").is_err());
        assert!(WorkflowRunEvent::parse(b"[").is_err());
        assert!(WorkflowRunEvent::parse(
            br#"{"action":"completed","workflow_run":{"id":1},"repository":{"full_name":"nope"}}"#
        )
        .is_err());
        assert!(WorkflowRunEvent::from_api("o/r", br#"{"id":1}"#).is_err());
    }

    #[test]
    fn other_actions_are_ignored() {
        let body =
            br#"{"action":"requested","workflow_run":{"id":1},"repository":{"full_name":"o/r"}}"#;
        assert_eq!(
            WorkflowRunEvent::parse(body).unwrap(),
            ParsedWorkflowRun::IgnoredAction("requested".into())
        );
    }
}
