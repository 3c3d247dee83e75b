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
        // PostgreSQL text cannot hold NUL: such a delivery is refused here,
        // plainly, instead of failing the ledger commit it shares with others.
        let texts = [
            Some(&j.name),
            j.workflow_name.as_ref(),
            j.conclusion.as_ref(),
            runner_name.as_ref(),
            j.html_url.as_ref(),
            Some(&p.repository.full_name),
            Some(&p.repository.owner.login),
            p.organization.as_ref().map(|o| &o.login),
        ];
        if texts
            .into_iter()
            .flatten()
            .chain(j.labels.iter())
            .any(|t| t.contains('\0'))
        {
            return Err(DomainError::MalformedPayload(
                "a text field holds a NUL character, which the ledger cannot store".into(),
            ));
        }
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

    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// Any JSON value, strings drawn to include NUL and other control
    /// characters.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            "[\\x00-\\x7f\\u{80}-\\u{10ffff}]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A payload of GitHub's shape with one field replaced by anything.
    fn mutated_payload() -> impl Strategy<Value = Value> {
        let paths: &[&[&str]] = &[
            &["action"],
            &["workflow_job", "id"],
            &["workflow_job", "run_id"],
            &["workflow_job", "name"],
            &["workflow_job", "labels"],
            &["workflow_job", "runner_name"],
            &["workflow_job", "created_at"],
            &["workflow_job", "run_attempt"],
            &["repository", "full_name"],
            &["repository", "owner", "login"],
            &["organization"],
            &["installation", "id"],
        ];
        (proptest::sample::select(paths.to_vec()), any_json()).prop_map(|(path, v)| {
            let mut payload = json!({
                "action": "queued",
                "workflow_job": {
                    "id": 1, "run_id": 2, "run_attempt": 1, "name": "proof",
                    "labels": ["self-hosted", "kani"], "runner_name": null,
                    "created_at": "2021-10-05T18:00:00Z"
                },
                "repository": {"full_name": "acme/proofs", "owner": {"login": "acme"}},
                "organization": {"login": "acme"},
                "installation": {"id": 3}
            });
            let mut at = &mut payload;
            for key in &path[..path.len() - 1] {
                at = &mut at[*key];
            }
            at[path[path.len() - 1]] = v;
            payload
        })
    }

    fn no_nul(e: &WorkflowJobEvent) -> bool {
        let texts = [
            Some(&e.name),
            e.workflow_name.as_ref(),
            e.conclusion.as_ref(),
            e.runner_name.as_ref(),
            e.html_url.as_ref(),
            Some(&e.repository),
            Some(&e.owner),
            e.org.as_ref(),
        ];
        texts
            .into_iter()
            .flatten()
            .chain(e.labels.iter())
            .all(|t| !t.contains('\0'))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes: a parse or a clear error, never a panic.
        #[test]
        fn any_body_parses_or_is_refused(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Err(e) = WorkflowJobEvent::parse(&body) {
                prop_assert!(!e.to_string().is_empty());
            }
        }

        /// Bodies of the real shape with one field wrong: an event the
        /// ledger can store, an ignored action, or a clear error.
        #[test]
        fn payload_mutations_parse_or_are_refused(payload in mutated_payload()) {
            let body = serde_json::to_vec(&payload).unwrap();
            match WorkflowJobEvent::parse(&body) {
                Ok(ParsedWorkflowJob::Event(e)) => {
                    prop_assert!(no_nul(&e), "{e:?}");
                    prop_assert_eq!(e.repository.split('/').count(), 2);
                }
                Ok(ParsedWorkflowJob::IgnoredAction(_)) => {}
                Err(e) => prop_assert!(e.to_string().starts_with("malformed"), "{e}"),
            }
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
