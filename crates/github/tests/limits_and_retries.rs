//! Rate limits go back to the caller; server errors are retried here.

mod common;

use std::time::Duration;

use common::token_github;
use secrecy::SecretString;
use serde_json::json;
use spot_runners_domain::ports::{GitHub, GitHubError, RunnerScope};
use spot_runners_github::{Auth, GitHubConfig, OctocrabGitHub};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const RUNNERS: &str = "/orgs/acme/actions/runners";

fn acme() -> RunnerScope {
    RunnerScope::Org("acme".into())
}

fn empty_list() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"total_count": 0, "runners": []}))
}

#[tokio::test]
async fn exhausted_primary_limit_waits_until_the_reset() {
    let server = MockServer::start().await;
    let reset = chrono::Utc::now().timestamp() + 90;
    Mock::given(method("GET"))
        .and(path(RUNNERS))
        .respond_with(
            ResponseTemplate::new(403)
                .insert_header("x-ratelimit-limit", "5000")
                .insert_header("x-ratelimit-remaining", "0")
                .insert_header("x-ratelimit-reset", reset.to_string().as_str())
                .set_body_json(
                    json!({"message": "API rate limit exceeded for installation ID 11."}),
                ),
        )
        // Not retried: the caller decides when to come back.
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);

    let err = github.list_runners(&acme()).await.unwrap_err();

    let GitHubError::RateLimited(wait) = err else {
        panic!("expected RateLimited, got {err:?}");
    };
    assert!(
        wait > Duration::from_secs(60) && wait <= Duration::from_secs(90),
        "{wait:?}"
    );
    assert_eq!(recorder.requests(), vec![("list_runners", 403)]);
    assert_eq!(recorder.remaining(), vec![0]);
}

#[tokio::test]
async fn retry_after_is_handed_back() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/orgs/acme/actions/runners/generate-jitconfig"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "7")
                .insert_header("x-ratelimit-remaining", "4321")
                .set_body_json(json!({"message": "You have exceeded a secondary rate limit."})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);

    let err = github
        .generate_jit_config(
            &acme(),
            &spot_runners_domain::ports::JitRequest {
                name: "r".into(),
                runner_group_id: 1,
                labels: vec!["self-hosted".into()],
            },
        )
        .await
        .unwrap_err();

    assert_eq!(err, GitHubError::RateLimited(Duration::from_secs(7)));
    assert_eq!(recorder.requests(), vec![("generate_jitconfig", 429)]);
    assert_eq!(recorder.remaining(), vec![4321]);
}

#[tokio::test]
async fn forbidden_without_a_limit_is_refused() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(RUNNERS))
        .respond_with(
            ResponseTemplate::new(403)
                .insert_header("x-ratelimit-remaining", "4999")
                .set_body_json(json!({"message": "Resource not accessible by integration"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);

    let err = github.list_runners(&acme()).await.unwrap_err();

    assert!(matches!(err, GitHubError::Refused(_)), "{err:?}");
    assert_eq!(recorder.remaining(), vec![4999]);
}

#[tokio::test]
async fn a_server_error_is_retried() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(RUNNERS))
        .respond_with(ResponseTemplate::new(502))
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(RUNNERS))
        .respond_with(empty_list())
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);

    let runners = github.list_runners(&acme()).await.unwrap();

    assert!(runners.is_empty());
    assert_eq!(
        recorder.requests(),
        vec![("list_runners", 502), ("list_runners", 200)]
    );
}

#[tokio::test]
async fn persistent_server_errors_end_as_transient() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/orgs/acme/actions/runners/5"))
        .respond_with(ResponseTemplate::new(500))
        // The first try and three retries.
        .expect(4)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);

    let err = github.delete_runner(&acme(), 5).await.unwrap_err();

    assert!(matches!(err, GitHubError::Transient(_)), "{err:?}");
    assert_eq!(recorder.requests(), vec![("delete_runner", 500); 4]);
}

#[tokio::test]
async fn service_unavailable_with_retry_after_is_not_hammered() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(RUNNERS))
        .respond_with(ResponseTemplate::new(503).insert_header("retry-after", "30"))
        .expect(1)
        .mount(&server)
        .await;
    let (github, _) = token_github(&server);

    let err = github.list_runners(&acme()).await.unwrap_err();

    assert_eq!(err, GitHubError::RateLimited(Duration::from_secs(30)));
}

#[tokio::test]
async fn an_unreachable_server_is_transient() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let github = OctocrabGitHub::new(GitHubConfig {
        api_url: format!("http://127.0.0.1:{port}"),
        auth: Auth::Token(SecretString::from("t")),
        metrics: None,
    })
    .unwrap()
    .with_retries(1, Duration::from_millis(1));

    let err = github.list_runners(&acme()).await.unwrap_err();

    assert!(matches!(err, GitHubError::Transient(_)), "{err:?}");
}

#[tokio::test]
async fn the_adapter_reports_the_rate_limit_github_sent_for_the_sweeps_to_pace_by() {
    let server = MockServer::start().await;
    let reset = chrono::Utc::now().timestamp() + 1200;
    Mock::given(method("GET"))
        .and(path(RUNNERS))
        .respond_with(
            empty_list()
                .insert_header("x-ratelimit-limit", "5000")
                .insert_header("x-ratelimit-remaining", "812")
                .insert_header("x-ratelimit-used", "4188")
                .insert_header("x-ratelimit-resource", "core")
                .insert_header("x-ratelimit-reset", reset.to_string().as_str()),
        )
        .mount(&server)
        .await;
    let (github, _) = token_github(&server);
    assert_eq!(github.rate_limit(), None, "nothing reported yet");

    github.list_runners(&acme()).await.unwrap();

    let limit = github.rate_limit().expect("reported");
    assert_eq!((limit.remaining, limit.limit), (812, 5000));
    assert_eq!(limit.reset_at.timestamp(), reset);
    assert_eq!(
        spot_runners_domain::api_budget::Spending::of(Some(limit), chrono::Utc::now()),
        spot_runners_domain::api_budget::Spending::Essential
    );
}
