//! GitHub App authentication: JWT → installation token per organization,
//! cached, refreshed before expiry, replaced when revoked.

mod common;

use common::{app_github, in_secs, AppJwt, APP_ID, TEST_KEY};
use secrecy::SecretString;
use serde_json::json;
use spot_runners_domain::ports::{GitHub, GitHubError, JitRequest, RunnerScope};
use spot_runners_github::{Auth, Error, GitHubConfig, OctocrabGitHub};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

async fn installation(server: &MockServer, lookup: &str, id: u64, expected_lookups: u64) {
    Mock::given(method("GET"))
        .and(path(lookup))
        .and(AppJwt)
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": id,
            "account": {"login": "whoever", "id": 1},
            "app_id": APP_ID
        })))
        .expect(expected_lookups)
        .mount(server)
        .await;
}

fn token(token: &str, expires_in_secs: i64) -> ResponseTemplate {
    ResponseTemplate::new(201)
        .set_body_json(json!({
            "token": token,
            "expires_at": in_secs(expires_in_secs),
            "permissions": {"organization_self_hosted_runners": "write"},
            "repository_selection": "all"
        }))
        .insert_header("x-ratelimit-remaining", "4999")
}

async fn runners_with(server: &MockServer, org: &str, bearer: &str, calls: u64) {
    Mock::given(method("GET"))
        .and(path(format!("/orgs/{org}/actions/runners")))
        .and(header("authorization", format!("Bearer {bearer}").as_str()))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"total_count": 0, "runners": []})),
        )
        .expect(calls)
        .mount(server)
        .await;
}

#[tokio::test]
async fn each_org_gets_its_own_installation_token_and_reuses_it() {
    let server = MockServer::start().await;
    installation(&server, "/orgs/acme/installation", 11, 1).await;
    installation(&server, "/orgs/globex/installation", 22, 1).await;
    Mock::given(method("POST"))
        .and(path("/app/installations/11/access_tokens"))
        .and(AppJwt)
        .respond_with(token("ghs_acme", 3600))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/app/installations/22/access_tokens"))
        .and(AppJwt)
        .respond_with(token("ghs_globex", 3600))
        .expect(1)
        .mount(&server)
        .await;
    runners_with(&server, "acme", "ghs_acme", 1).await;
    runners_with(&server, "ACME", "ghs_acme", 1).await;
    runners_with(&server, "globex", "ghs_globex", 1).await;
    let (github, recorder) = app_github(&server);
    let acme = RunnerScope::Org("acme".into());

    github.list_runners(&acme).await.unwrap();
    github
        .list_runners(&RunnerScope::Org("globex".into()))
        .await
        .unwrap();
    // Same org under another spelling: logins are case-insensitive.
    github
        .list_runners(&RunnerScope::Org("ACME".into()))
        .await
        .unwrap();

    assert_eq!(
        recorder.requests(),
        vec![
            ("get_installation", 200),
            ("installation_token", 201),
            ("list_runners", 200),
            ("get_installation", 200),
            ("installation_token", 201),
            ("list_runners", 200),
            ("list_runners", 200),
        ]
    );
}

#[tokio::test]
async fn concurrent_calls_share_one_token_exchange() {
    let server = MockServer::start().await;
    installation(&server, "/orgs/acme/installation", 11, 1).await;
    Mock::given(method("POST"))
        .and(path("/app/installations/11/access_tokens"))
        .and(AppJwt)
        .respond_with(token("ghs_acme", 3600))
        .expect(1)
        .mount(&server)
        .await;
    runners_with(&server, "acme", "ghs_acme", 8).await;
    let (github, _) = app_github(&server);
    let acme = RunnerScope::Org("acme".into());

    let calls = (0..8).map(|_| github.list_runners(&acme));
    for result in futures::future::join_all(calls).await {
        result.unwrap();
    }
}

#[tokio::test]
async fn a_token_close_to_expiry_is_refreshed() {
    let server = MockServer::start().await;
    installation(&server, "/orgs/acme/installation", 11, 1).await;
    // Two minutes left: inside the five-minute refresh margin.
    Mock::given(method("POST"))
        .and(path("/app/installations/11/access_tokens"))
        .and(AppJwt)
        .respond_with(token("ghs_first", 120))
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/app/installations/11/access_tokens"))
        .and(AppJwt)
        .respond_with(token("ghs_second", 3600))
        .expect(1)
        .mount(&server)
        .await;
    runners_with(&server, "acme", "ghs_first", 1).await;
    runners_with(&server, "acme", "ghs_second", 2).await;
    let (github, _) = app_github(&server);
    let acme = RunnerScope::Org("acme".into());

    github.list_runners(&acme).await.unwrap();
    github.list_runners(&acme).await.unwrap();
    github.list_runners(&acme).await.unwrap();
}

#[tokio::test]
async fn a_revoked_token_is_replaced_once() {
    let server = MockServer::start().await;
    installation(&server, "/orgs/acme/installation", 11, 1).await;
    Mock::given(method("POST"))
        .and(path("/app/installations/11/access_tokens"))
        .respond_with(token("ghs_revoked", 3600))
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/app/installations/11/access_tokens"))
        .respond_with(token("ghs_fresh", 3600))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/orgs/acme/actions/runners/9"))
        .and(header("authorization", "Bearer ghs_revoked"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(json!({"message": "Bad credentials"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/orgs/acme/actions/runners/9"))
        .and(header("authorization", "Bearer ghs_fresh"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    let (github, _) = app_github(&server);

    github
        .delete_runner(&RunnerScope::Org("acme".into()), 9)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_user_repository_uses_the_repository_installation() {
    let server = MockServer::start().await;
    installation(&server, "/repos/octocat/hello-world/installation", 33, 1).await;
    Mock::given(method("POST"))
        .and(path("/app/installations/33/access_tokens"))
        .and(AppJwt)
        .respond_with(token("ghs_octocat", 3600))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(
            "/repos/octocat/hello-world/actions/runners/generate-jitconfig",
        ))
        .and(header("authorization", "Bearer ghs_octocat"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "runner": {"id": 5, "name": "r"},
            "encoded_jit_config": "Zm9v"
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/octocat/hello-world/actions/jobs/77"))
        .and(header("authorization", "Bearer ghs_octocat"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "status": "in_progress", "conclusion": null, "runner_name": "r"
        })))
        .expect(1)
        .mount(&server)
        .await;
    let (github, _) = app_github(&server);

    let config = github
        .generate_jit_config(
            &RunnerScope::Repo("octocat/hello-world".into()),
            &JitRequest {
                name: "r".into(),
                runner_group_id: 1,
                labels: vec!["self-hosted".into()],
            },
        )
        .await
        .unwrap();
    assert_eq!(config.runner_id, 5);

    let job = github.job("octocat/hello-world", 77).await.unwrap();
    assert_eq!(job.status, "in_progress");
}

#[tokio::test]
async fn an_org_without_the_app_is_refused() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/orgs/initech/installation"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"message": "Not Found"})))
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = app_github(&server);

    let err = github
        .list_runners(&RunnerScope::Org("initech".into()))
        .await
        .unwrap_err();

    assert!(
        matches!(&err, GitHubError::Refused(m) if m.contains("not installed")),
        "{err:?}"
    );
    assert_eq!(recorder.requests(), vec![("get_installation", 404)]);
}

/// `GET /app/installations`, as the App (JWT), every page: the orgs known
/// before any webhook.
#[tokio::test]
async fn the_apps_installations_are_listed_page_by_page() {
    let server = MockServer::start().await;
    let item = |id: i64, login: &str, kind: &str| {
        json!({
            "id": id,
            "account": {"login": login, "id": id * 10, "type": kind},
            "app_id": APP_ID,
            "target_type": kind,
            "permissions": {"organization_self_hosted_runners": "write"},
            "events": ["workflow_job"]
        })
    };
    let first: Vec<_> = (0..100)
        .map(|i| item(1000 + i, &format!("org{i}"), "Organization"))
        .collect();
    Mock::given(method("GET"))
        .and(path("/app/installations"))
        .and(wiremock::matchers::query_param("page", "1"))
        .and(AppJwt)
        .respond_with(ResponseTemplate::new(200).set_body_json(first))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/app/installations"))
        .and(wiremock::matchers::query_param("page", "2"))
        .and(AppJwt)
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([
            item(7, "acme", "Organization"),
            item(8, "octocat", "User")
        ])))
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = app_github(&server);

    let list = github.installations().await.unwrap();

    assert_eq!(list.len(), 102);
    let acme = list.iter().find(|i| i.account == "acme").unwrap();
    assert_eq!(acme.id, 7);
    assert_eq!(acme.scope(), Some(RunnerScope::Org("acme".into())));
    let user = list.iter().find(|i| i.account == "octocat").unwrap();
    assert_eq!(
        user.scope(),
        None,
        "a user account has no org-level runners"
    );
    assert_eq!(
        recorder.requests(),
        vec![("list_installations", 200), ("list_installations", 200)]
    );
}

#[tokio::test]
async fn a_token_lists_no_installations() {
    let server = MockServer::start().await;
    let github = OctocrabGitHub::new(GitHubConfig {
        api_url: server.uri(),
        auth: Auth::Token(SecretString::from("ghp_test")),
        metrics: None,
    })
    .unwrap();
    assert!(github.installations().await.unwrap().is_empty());
    assert!(server.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_bad_private_key_fails_construction() {
    for pem in [
        "not a key".to_owned(),
        "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n".to_owned(),
    ] {
        let result = OctocrabGitHub::new(GitHubConfig {
            api_url: "https://api.github.com".into(),
            auth: Auth::App {
                app_id: APP_ID,
                private_key_pem: SecretString::from(pem),
            },
            metrics: None,
        });
        assert!(
            matches!(result, Err(Error::InvalidPrivateKey(_))),
            "{result:?}"
        );
    }
}

#[tokio::test]
async fn secrets_stay_out_of_debug_output() {
    let server = MockServer::start().await;
    let (github, _) = app_github(&server);
    let key_line = TEST_KEY.lines().nth(1).unwrap();

    let app_config = GitHubConfig {
        api_url: server.uri(),
        auth: Auth::App {
            app_id: APP_ID,
            private_key_pem: SecretString::from(TEST_KEY),
        },
        metrics: None,
    };
    let token_config = GitHubConfig {
        api_url: server.uri(),
        auth: Auth::Token(SecretString::from("ghp_supersecret")),
        metrics: None,
    };
    let token_github = OctocrabGitHub::new(token_config.clone()).unwrap();

    for output in [
        format!("{github:?}"),
        format!("{app_config:?}"),
        format!("{token_config:?}"),
        format!("{token_github:?}"),
    ] {
        assert!(!output.contains(key_line), "{output}");
        assert!(!output.contains("PRIVATE KEY"), "{output}");
        assert!(!output.contains("ghp_supersecret"), "{output}");
    }
}
