//! The runs API and the two re-run endpoints, with GitHub's real answers:
//! 201 with an empty object, 403 with a message saying why not.

mod common;

use std::time::Duration;

use common::token_github;
use serde_json::json;
use spot_runners_domain::ports::{GitHub, GitHubError};
use spot_runners_domain::survival::RerunFailure;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const RUN: &str = include_str!("fixtures/workflow-run.json");

#[tokio::test]
async fn a_workflow_run_is_read_from_the_runs_api() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/octo-org/octo-repo/actions/runs/289782451"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(RUN, "application/json"))
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);

    let run = github
        .workflow_run("octo-org/octo-repo", 289782451)
        .await
        .unwrap();

    assert_eq!(run.run_id, 289782451);
    assert_eq!(run.run_attempt, 1);
    assert_eq!(run.repository, "octo-org/octo-repo");
    assert!(run.is_completed());
    assert_eq!(run.conclusion.as_deref(), Some("success"));
    assert_eq!(recorder.requests(), vec![("get_workflow_run", 200)]);
}

#[tokio::test]
async fn an_unknown_run_is_not_found() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/octo-org/octo-repo/actions/runs/1"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"message": "Not Found"})))
        .mount(&server)
        .await;
    let (github, _) = token_github(&server);
    assert_eq!(
        github
            .workflow_run("octo-org/octo-repo", 1)
            .await
            .unwrap_err(),
        GitHubError::NotFound
    );
}

#[tokio::test]
async fn a_job_rerun_posts_to_the_job_and_accepts_201() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/repos/acme/proofs/actions/jobs/399444496/rerun"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({})))
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);
    github.rerun_job("acme/proofs", 399444496).await.unwrap();
    assert_eq!(recorder.requests(), vec![("rerun_job", 201)]);
}

#[tokio::test]
async fn rerun_failed_jobs_posts_to_the_run() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(
            "/repos/acme/proofs/actions/runs/30433642/rerun-failed-jobs",
        ))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({})))
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);
    github
        .rerun_failed_jobs("acme/proofs", 30433642)
        .await
        .unwrap();
    assert_eq!(recorder.requests(), vec![("rerun_failed_jobs", 201)]);
}

#[tokio::test]
async fn refusals_come_back_with_githubs_status_and_message() {
    let server = MockServer::start().await;
    for (job, status, message) in [
        (1, 403, "This workflow is already running"),
        (2, 403, "This workflow run cannot be retried"),
        (3, 409, "Conflict"),
        (4, 422, "Validation Failed"),
    ] {
        Mock::given(method("POST"))
            .and(path(format!("/repos/acme/proofs/actions/jobs/{job}/rerun")))
            .respond_with(ResponseTemplate::new(status).set_body_json(json!({
                "message": message,
                "documentation_url": "https://docs.github.com/rest/actions/workflow-runs#re-run-a-job-from-a-workflow-run"
            })))
            .mount(&server)
            .await;
    }
    let (github, _) = token_github(&server);
    for (job, status, message) in [
        (1, 403, "This workflow is already running"),
        (2, 403, "This workflow run cannot be retried"),
        (3, 409, "Conflict"),
        (4, 422, "Validation Failed"),
    ] {
        assert_eq!(
            github.rerun_job("acme/proofs", job).await.unwrap_err(),
            RerunFailure::Rejected {
                status,
                message: message.into()
            }
        );
    }
}

#[tokio::test]
async fn a_rate_limited_403_is_a_rate_limit_not_a_refusal() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/repos/acme/proofs/actions/jobs/5/rerun"))
        .respond_with(
            ResponseTemplate::new(403)
                .insert_header("retry-after", "30")
                .set_body_json(json!({"message": "You have exceeded a secondary rate limit"})),
        )
        .mount(&server)
        .await;
    let (github, _) = token_github(&server);
    assert_eq!(
        github.rerun_job("acme/proofs", 5).await.unwrap_err(),
        RerunFailure::RateLimited(Duration::from_secs(30))
    );
}
