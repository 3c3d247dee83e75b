//! `workflow_job` and `workflow_run` webhook bodies of GitHub's shape (see
//! the official examples in `crates/server/tests/fixtures/`), built from a
//! simulated job or run, and the delivery that carries them.

use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use serde_json::{json, Value};

/// One webhook delivery, as GitHub would POST it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// `X-GitHub-Event`.
    pub event: &'static str,
    /// `X-GitHub-Delivery`: a redelivery keeps it.
    pub guid: String,
    /// The payload's `action` (`queued`, `in_progress`, `completed`).
    pub action: &'static str,
    /// The job's id (`workflow_job`) or the run's (`workflow_run`).
    pub job_id: i64,
    /// The JSON body.
    pub body: String,
}

/// What a payload says about a job at the moment it is sent.
pub struct JobSnapshot<'a> {
    pub id: i64,
    pub run_id: i64,
    pub run_attempt: i32,
    pub name: &'a str,
    pub workflow_name: &'a str,
    pub repository: &'a str,
    pub org: &'a str,
    pub labels: &'a [String],
    pub status: &'static str,
    pub conclusion: Option<&'a str>,
    /// `(name, id)` of the runner that took it.
    pub runner: Option<(&'a str, i64)>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The body of a `workflow_job` delivery with this action.
pub fn workflow_job(action: &'static str, job: &JobSnapshot<'_>) -> String {
    let (owner, repo) = job
        .repository
        .split_once('/')
        .unwrap_or((job.org, job.repository));
    let api = format!("https://api.github.com/repos/{}", job.repository);
    let html = format!("https://github.com/{}", job.repository);
    let body: Value = json!({
        "action": action,
        "workflow_job": {
            "id": job.id,
            "run_id": job.run_id,
            "run_attempt": job.run_attempt,
            "run_url": format!("{api}/actions/runs/{}", job.run_id),
            "url": format!("{api}/actions/jobs/{}", job.id),
            "html_url": format!("{html}/actions/runs/{}/job/{}", job.run_id, job.id),
            "head_branch": "main",
            "head_sha": format!("{:040x}", job.run_id),
            "status": job.status,
            "conclusion": job.conclusion,
            // GitHub reports a queued job's started_at as its creation time.
            "created_at": ts(job.created_at),
            "started_at": ts(job.started_at.unwrap_or(job.created_at)),
            "completed_at": job.completed_at.map(ts),
            "name": job.name,
            "steps": [],
            "labels": job.labels,
            "runner_id": job.runner.map(|(_, id)| id),
            "runner_name": job.runner.map(|(name, _)| name),
            "runner_group_id": job.runner.map(|_| 1),
            "runner_group_name": job.runner.map(|_| "Default"),
            "workflow_name": job.workflow_name,
        },
        "repository": {
            "id": 4_200_000 + i64::from(repo.len() as u32),
            "name": repo,
            "full_name": job.repository,
            "private": true,
            "owner": { "login": owner, "type": "Organization" },
            "html_url": html,
        },
        "organization": { "login": job.org },
        "installation": { "id": 42 },
        "sender": { "login": "simulated-developer", "type": "User" },
    });
    body.to_string()
}

/// What a `workflow_run` payload says about a run when it completes.
pub struct RunSnapshot<'a> {
    pub id: i64,
    pub run_attempt: i32,
    pub workflow_name: &'a str,
    pub repository: &'a str,
    pub org: &'a str,
    pub conclusion: &'a str,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The body of a `workflow_run` `completed` delivery.
pub fn workflow_run_completed(run: &RunSnapshot<'_>) -> String {
    let (owner, repo) = run
        .repository
        .split_once('/')
        .unwrap_or((run.org, run.repository));
    let api = format!("https://api.github.com/repos/{}", run.repository);
    let repository = json!({
        "id": 4_200_000 + i64::from(repo.len() as u32),
        "name": repo,
        "full_name": run.repository,
        "private": true,
        "owner": { "login": owner, "type": "Organization" },
    });
    let body: Value = json!({
        "action": "completed",
        "workflow_run": {
            "id": run.id,
            "name": run.workflow_name,
            "run_attempt": run.run_attempt,
            "run_number": run.id % 10_000,
            "event": "push",
            "status": "completed",
            "conclusion": run.conclusion,
            "head_branch": "main",
            "head_sha": format!("{:040x}", run.id),
            "url": format!("{api}/actions/runs/{}", run.id),
            "html_url": format!("https://github.com/{}/actions/runs/{}", run.repository, run.id),
            "jobs_url": format!("{api}/actions/runs/{}/jobs", run.id),
            "rerun_url": format!("{api}/actions/runs/{}/rerun", run.id),
            "created_at": ts(run.created_at),
            "updated_at": ts(run.updated_at),
            "run_started_at": ts(run.created_at),
            "repository": repository.clone(),
        },
        "repository": repository,
        "organization": { "login": run.org },
        "installation": { "id": 42 },
        "sender": { "login": "simulated-developer", "type": "User" },
    });
    body.to_string()
}

/// A delivery GUID of GitHub's form, from the simulation's generator.
pub fn guid<R: Rng + ?Sized>(rng: &mut R) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        rng.gen::<u32>(),
        rng.gen::<u16>(),
        rng.gen::<u16>(),
        rng.gen::<u16>(),
        rng.gen::<u64>() & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use spot_runners_domain::job::ParsedWorkflowJob;
    use spot_runners_domain::{JobStatus, WorkflowJobEvent};

    #[test]
    fn the_services_parser_reads_it() {
        let labels = vec!["self-hosted".to_owned(), "kani".to_owned()];
        let t = DateTime::<Utc>::from_timestamp(1_767_571_200, 0).unwrap();
        let job = JobSnapshot {
            id: 7,
            run_id: 70,
            run_attempt: 2,
            name: "proof",
            workflow_name: "Kani",
            repository: "acme/proofs",
            org: "acme",
            labels: &labels,
            status: "in_progress",
            conclusion: None,
            runner: Some(("spot-runners-kani-abcd1234", 3)),
            created_at: t,
            started_at: Some(t),
            completed_at: None,
        };
        let body = workflow_job("in_progress", &job);
        let ParsedWorkflowJob::Event(ev) = WorkflowJobEvent::parse(body.as_bytes()).unwrap() else {
            panic!("ignored");
        };
        assert_eq!(ev.status, JobStatus::InProgress);
        assert_eq!(ev.job_id, 7);
        assert_eq!(ev.org.as_deref(), Some("acme"));
        assert_eq!(ev.repository, "acme/proofs");
        assert_eq!(
            ev.runner_name.as_deref(),
            Some("spot-runners-kani-abcd1234")
        );
        assert_eq!(ev.runner_id, Some(3));
        assert_eq!(ev.labels, labels);
        assert_eq!(ev.created_at, Some(t));
        assert_eq!(ev.run_attempt, 2);
    }

    #[test]
    fn the_services_parser_reads_a_completed_run() {
        use spot_runners_domain::run::{ParsedWorkflowRun, WorkflowRunEvent};
        let t = DateTime::<Utc>::from_timestamp(1_767_571_200, 0).unwrap();
        let body = workflow_run_completed(&RunSnapshot {
            id: 70,
            run_attempt: 2,
            workflow_name: "Kani",
            repository: "acme/proofs",
            org: "acme",
            conclusion: "failure",
            created_at: t,
            updated_at: t,
        });
        let ParsedWorkflowRun::Completed(run) = WorkflowRunEvent::parse(body.as_bytes()).unwrap()
        else {
            panic!("ignored");
        };
        assert_eq!(run.run_id, 70);
        assert_eq!(run.run_attempt, 2);
        assert_eq!(run.repository, "acme/proofs");
        assert!(run.is_completed());
        assert_eq!(run.conclusion.as_deref(), Some("failure"));
    }
}
