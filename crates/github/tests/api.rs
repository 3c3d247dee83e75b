//! Requests and answers of each port method, with plain-token auth.

mod common;

use common::{token_github, TOKEN};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use spot_runners_domain::ports::{GitHub, GitHubError, JitRequest, RunnerScope};
use spot_runners_github::{Auth, GitHubConfig, OctocrabGitHub};
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn jit_request() -> JitRequest {
    JitRequest {
        name: "ctl-linux-x64-a1b2c3".into(),
        runner_group_id: 7,
        labels: vec!["self-hosted".into(), "linux".into(), "x64".into()],
    }
}

fn jit_response(id: i64) -> serde_json::Value {
    json!({
        "runner": {
            "id": id,
            "name": "ctl-linux-x64-a1b2c3",
            "os": "unknown",
            "status": "offline",
            "busy": false,
            "labels": [{"id": 0, "name": "self-hosted", "type": "read-only"}]
        },
        "encoded_jit_config": "ZW5jb2RlZC1qaXQtY29uZmln"
    })
}

fn expected_body() -> serde_json::Value {
    json!({
        "name": "ctl-linux-x64-a1b2c3",
        "runner_group_id": 7,
        "labels": ["self-hosted", "linux", "x64"],
        "work_folder": "_work"
    })
}

#[tokio::test]
async fn jit_config_for_an_org_posts_name_group_and_labels() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/orgs/acme/actions/runners/generate-jitconfig"))
        .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
        .and(header("x-github-api-version", "2022-11-28"))
        .and(body_json(expected_body()))
        .respond_with(ResponseTemplate::new(201).set_body_json(jit_response(42)))
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);

    let config = github
        .generate_jit_config(&RunnerScope::Org("acme".into()), &jit_request())
        .await
        .unwrap();

    assert_eq!(config.runner_id, 42);
    assert_eq!(config.encoded.expose_secret(), "ZW5jb2RlZC1qaXQtY29uZmln");
    assert_eq!(recorder.requests(), vec![("generate_jitconfig", 201)]);
}

#[tokio::test]
async fn jit_config_for_a_user_repository_uses_the_repository_endpoint() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(
            "/repos/octocat/hello-world/actions/runners/generate-jitconfig",
        ))
        .and(body_json(expected_body()))
        .respond_with(ResponseTemplate::new(201).set_body_json(jit_response(43)))
        .expect(1)
        .mount(&server)
        .await;
    let (github, _) = token_github(&server);

    let config = github
        .generate_jit_config(
            &RunnerScope::Repo("octocat/hello-world".into()),
            &jit_request(),
        )
        .await
        .unwrap();

    assert_eq!(config.runner_id, 43);
}

#[tokio::test]
async fn an_api_url_with_a_path_prefixes_every_request() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v3/orgs/acme/actions/runners/generate-jitconfig"))
        .respond_with(ResponseTemplate::new(201).set_body_json(jit_response(44)))
        .expect(1)
        .mount(&server)
        .await;
    let github = OctocrabGitHub::new(GitHubConfig {
        api_url: format!("{}/api/v3/", server.uri()),
        auth: Auth::Token(SecretString::from(TOKEN)),
        metrics: None,
    })
    .unwrap();

    let config = github
        .generate_jit_config(&RunnerScope::Org("acme".into()), &jit_request())
        .await
        .unwrap();

    assert_eq!(config.runner_id, 44);
}

#[tokio::test]
async fn conflict_means_the_name_is_taken() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/orgs/acme/actions/runners/generate-jitconfig"))
        .respond_with(ResponseTemplate::new(409).set_body_json(json!({
            "message": "Already exists - A runner with the name ctl-linux-x64-a1b2c3 already exists.",
            "status": "409"
        })))
        .expect(1)
        .mount(&server)
        .await;
    let (github, _) = token_github(&server);

    let err = github
        .generate_jit_config(&RunnerScope::Org("acme".into()), &jit_request())
        .await
        .unwrap_err();

    assert_eq!(err, GitHubError::NameTaken);
}

fn runner(id: i64) -> serde_json::Value {
    json!({
        "id": id,
        "name": format!("runner-{id}"),
        "os": "linux",
        "status": if id % 2 == 0 { "online" } else { "offline" },
        "busy": id % 3 == 0,
        "labels": [
            {"id": 1, "name": "self-hosted", "type": "read-only"},
            {"id": 2, "name": "linux", "type": "custom"}
        ]
    })
}

fn page(ids: std::ops::RangeInclusive<i64>, total: usize) -> ResponseTemplate {
    let runners: Vec<_> = ids.map(runner).collect();
    ResponseTemplate::new(200)
        .set_body_json(json!({"total_count": total, "runners": runners}))
        .insert_header("x-ratelimit-remaining", "4990")
}

#[tokio::test]
async fn list_runners_follows_every_page() {
    let server = MockServer::start().await;
    for (number, ids) in [(1, 1..=100), (2, 101..=200), (3, 201..=205)] {
        Mock::given(method("GET"))
            .and(path("/orgs/acme/actions/runners"))
            .and(query_param("per_page", "100"))
            .and(query_param("page", number.to_string().as_str()))
            .respond_with(page(ids, 205))
            .expect(1)
            .mount(&server)
            .await;
    }
    let (github, recorder) = token_github(&server);

    let runners = github
        .list_runners(&RunnerScope::Org("acme".into()))
        .await
        .unwrap();

    assert_eq!(runners.len(), 205);
    assert_eq!(
        runners.iter().map(|r| r.id).collect::<Vec<_>>(),
        (1..=205).collect::<Vec<_>>()
    );
    let sixth = &runners[5];
    assert_eq!(sixth.name, "runner-6");
    assert!(sixth.online && sixth.busy);
    assert_eq!(sixth.labels, vec!["self-hosted", "linux"]);
    assert!(!runners[0].online && !runners[0].busy);
    assert_eq!(recorder.requests(), vec![("list_runners", 200); 3]);
    assert_eq!(recorder.remaining(), vec![4990; 3]);
}

#[tokio::test]
async fn a_runner_seen_on_two_pages_is_listed_once() {
    let server = MockServer::start().await;
    // Runner 100 slid onto page 2 after a deletion between the two calls.
    for (number, ids) in [(1, 1..=100), (2, 100..=150)] {
        Mock::given(method("GET"))
            .and(path("/repos/octocat/hello-world/actions/runners"))
            .and(query_param("page", number.to_string().as_str()))
            .respond_with(page(ids, 150))
            .expect(1)
            .mount(&server)
            .await;
    }
    let (github, _) = token_github(&server);

    let runners = github
        .list_runners(&RunnerScope::Repo("octocat/hello-world".into()))
        .await
        .unwrap();

    assert_eq!(runners.len(), 150);
}

#[tokio::test]
async fn deleting_a_runner_succeeds_when_deleted_or_already_gone() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/orgs/acme/actions/runners/17"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/orgs/acme/actions/runners/18"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"message": "Not Found"})))
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);
    let scope = RunnerScope::Org("acme".into());

    github.delete_runner(&scope, 17).await.unwrap();
    github.delete_runner(&scope, 18).await.unwrap();

    assert_eq!(
        recorder.requests(),
        vec![("delete_runner", 204), ("delete_runner", 404)]
    );
}

#[tokio::test]
async fn deleting_a_busy_runner_is_refused() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/orgs/acme/actions/runners/19"))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({
            "message": "Bad request - Runner \"r\" is still running a job\""
        })))
        .expect(1)
        .mount(&server)
        .await;
    let (github, _) = token_github(&server);

    let err = github
        .delete_runner(&RunnerScope::Org("acme".into()), 19)
        .await
        .unwrap_err();

    assert!(
        matches!(&err, GitHubError::Refused(m) if m.contains("still running a job")),
        "{err:?}"
    );
}

#[tokio::test]
async fn job_reports_status_conclusion_and_runner() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/acme/app/actions/jobs/399444496"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": 399444496,
            "run_id": 29679449,
            "status": "completed",
            "conclusion": "success",
            "runner_id": 1,
            "runner_name": "ctl-linux-x64-a1b2c3",
            "labels": ["self-hosted", "linux"]
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/acme/app/actions/jobs/1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": 1, "status": "queued", "conclusion": null, "runner_name": null
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/acme/app/actions/jobs/2"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"message": "Not Found"})))
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);

    let done = github.job("acme/app", 399444496).await.unwrap();
    assert_eq!(done.status, "completed");
    assert_eq!(done.conclusion.as_deref(), Some("success"));
    assert_eq!(done.runner_name.as_deref(), Some("ctl-linux-x64-a1b2c3"));

    let queued = github.job("acme/app", 1).await.unwrap();
    assert_eq!(queued.status, "queued");
    assert_eq!(queued.conclusion, None);
    assert_eq!(queued.runner_name, None);

    assert_eq!(
        github.job("acme/app", 2).await.unwrap_err(),
        GitHubError::NotFound
    );
    assert_eq!(
        recorder.requests(),
        vec![("get_job", 200), ("get_job", 200), ("get_job", 404)]
    );
}

#[tokio::test]
async fn bad_credentials_are_refused() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/orgs/acme/actions/runners"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(json!({"message": "Bad credentials"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let (github, _) = token_github(&server);

    let err = github
        .list_runners(&RunnerScope::Org("acme".into()))
        .await
        .unwrap_err();

    assert!(
        matches!(&err, GitHubError::Refused(m) if m.contains("Bad credentials")),
        "{err:?}"
    );
}

#[tokio::test]
async fn names_that_would_escape_the_path_never_reach_the_network() {
    let server = MockServer::start().await;
    let (github, recorder) = token_github(&server);

    let org = github
        .list_runners(&RunnerScope::Org("../app/installations".into()))
        .await;
    let repo = github
        .delete_runner(&RunnerScope::Repo("acme/app/../../x".into()), 1)
        .await;
    let job = github.job("acme?x=1/app", 1).await;

    for result in [org.map(|_| ()), repo, job.map(|_| ())] {
        assert!(matches!(result, Err(GitHubError::Refused(_))), "{result:?}");
    }
    assert!(server.received_requests().await.unwrap().is_empty());
    assert!(recorder.requests().is_empty());
}

#[tokio::test]
async fn queued_jobs_come_from_queued_and_running_workflow_runs() {
    let server = MockServer::start().await;
    for (status, run) in [("queued", 11), ("in_progress", 12)] {
        Mock::given(method("GET"))
            .and(path("/repos/acme/app/actions/runs"))
            .and(query_param("status", status))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "total_count": 1,
                "workflow_runs": [{"id": run, "status": status}]
            })))
            .expect(1)
            .mount(&server)
            .await;
    }
    let job = |id: i64, run: i64, status: &str| {
        json!({
            "id": id, "run_id": run, "run_attempt": 2, "status": status, "conclusion": null,
            "name": format!("proof {id}"), "workflow_name": "Kani",
            "labels": ["self-hosted", "linux", "x64", "kani"],
            "html_url": format!("https://github.com/acme/app/actions/runs/{run}/job/{id}"),
            "created_at": "2026-11-28T10:00:00Z"
        })
    };
    Mock::given(method("GET"))
        .and(path("/repos/acme/app/actions/runs/11/jobs"))
        .and(query_param("filter", "latest"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "total_count": 1, "jobs": [job(1, 11, "queued")]
        })))
        .expect(1)
        .mount(&server)
        .await;
    // A matrix wider than the fleet: some jobs run, others wait.
    Mock::given(method("GET"))
        .and(path("/repos/acme/app/actions/runs/12/jobs"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "total_count": 3,
            "jobs": [job(2, 12, "in_progress"), job(3, 12, "queued"), job(4, 12, "completed")]
        })))
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);

    let queued = github.queued_jobs("acme/app").await.unwrap();
    let ids: Vec<i64> = queued.iter().map(|j| j.id).collect();
    assert_eq!(ids, [1, 3]);
    assert_eq!(queued[0].run_id, 11);
    assert_eq!(queued[0].run_attempt, 2);
    assert_eq!(queued[0].name, "proof 1");
    assert_eq!(queued[0].workflow_name.as_deref(), Some("Kani"));
    assert_eq!(queued[0].labels, ["self-hosted", "linux", "x64", "kani"]);
    assert!(queued[0].created_at.is_some());
    assert_eq!(
        recorder.requests(),
        vec![
            ("list_workflow_runs", 200),
            ("list_workflow_runs", 200),
            ("list_jobs_for_run", 200),
            ("list_jobs_for_run", 200)
        ]
    );
}
