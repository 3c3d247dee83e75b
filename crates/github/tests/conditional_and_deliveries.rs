//! Conditional runner listings (`ETag` / `If-None-Match`) and the webhook
//! delivery log (list with cursors, redeliver), against a wiremock GitHub.

mod common;

use chrono::{TimeZone, Utc};
use common::{app_github, token_github, AppJwt, TOKEN};
use serde_json::json;
use spot_runners_domain::ports::{GitHub, GitHubError, RunnerScope, WebhookSource};
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

fn runner(id: i64, status: &str) -> serde_json::Value {
    json!({
        "id": id,
        "name": format!("ctl-kani-{id}"),
        "os": "linux",
        "status": status,
        "busy": false,
        "labels": [{"id": 1, "name": "self-hosted", "type": "read-only"}]
    })
}

/// The first listing carries no `If-None-Match`; GitHub answers with an ETag.
struct Unconditional;
impl wiremock::Match for Unconditional {
    fn matches(&self, request: &Request) -> bool {
        !request.headers.contains_key("if-none-match")
    }
}

#[tokio::test]
async fn an_unchanged_listing_is_asked_for_conditionally_and_served_from_the_cache() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/orgs/acme/actions/runners"))
        .and(Unconditional)
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("etag", r#"W/"listing-v1""#)
                .set_body_json(json!({
                    "total_count": 2,
                    "runners": [runner(1, "online"), runner(2, "offline")]
                })),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/orgs/acme/actions/runners"))
        .and(header("if-none-match", r#"W/"listing-v1""#))
        .respond_with(ResponseTemplate::new(304).insert_header("etag", r#"W/"listing-v1""#))
        .expect(2)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);
    let scope = RunnerScope::Org("acme".into());

    let first = github.list_runners(&scope).await.unwrap();
    let second = github.list_runners(&scope).await.unwrap();
    let third = github.list_runners(&scope).await.unwrap();

    assert_eq!(first.len(), 2);
    assert!(first[0].online && !first[1].online);
    assert_eq!(second, first, "a 304 returns the cached list");
    assert_eq!(third, first);
    assert_eq!(
        recorder.requests(),
        vec![
            ("list_runners", 200),
            ("list_runners", 304),
            ("list_runners", 304)
        ]
    );
}

#[tokio::test]
async fn a_changed_listing_replaces_the_cache() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/orgs/acme/actions/runners"))
        .and(Unconditional)
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("etag", r#""v1""#)
                .set_body_json(json!({"total_count": 1, "runners": [runner(1, "offline")]})),
        )
        .expect(1)
        .mount(&server)
        .await;
    // The runner came online: a new body with a new ETag.
    Mock::given(method("GET"))
        .and(path("/orgs/acme/actions/runners"))
        .and(header("if-none-match", r#""v1""#))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("etag", r#""v2""#)
                .set_body_json(json!({"total_count": 1, "runners": [runner(1, "online")]})),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/orgs/acme/actions/runners"))
        .and(header("if-none-match", r#""v2""#))
        .respond_with(ResponseTemplate::new(304))
        .expect(1)
        .mount(&server)
        .await;
    let (github, _) = token_github(&server);
    let scope = RunnerScope::Org("acme".into());

    assert!(!github.list_runners(&scope).await.unwrap()[0].online);
    assert!(github.list_runners(&scope).await.unwrap()[0].online);
    assert!(
        github.list_runners(&scope).await.unwrap()[0].online,
        "the 304 serves the newer page"
    );
}

struct NoCursor;
impl wiremock::Match for NoCursor {
    fn matches(&self, request: &Request) -> bool {
        !request.url.query_pairs().any(|(k, _)| k == "cursor")
    }
}

fn attempt(id: i64, guid: &str, minute: u32, status_code: u16) -> serde_json::Value {
    json!({
        "id": id,
        "guid": guid,
        "delivered_at": Utc.with_ymd_and_hms(2026, 12, 1, 10, minute, 0).unwrap().to_rfc3339(),
        "redelivery": false,
        "duration": 0.27,
        "status": if status_code == 503 { "Service Unavailable" } else { "OK" },
        "status_code": status_code,
        "event": "workflow_job",
        "action": "queued",
        "installation_id": 7,
        "repository_id": 9,
        "throttled_at": null
    })
}

#[tokio::test]
async fn the_apps_delivery_log_is_read_page_by_page_with_the_jwt_back_to_since() {
    let server = MockServer::start().await;
    let next = format!(
        r#"<{}/app/hook/deliveries?per_page=100&cursor=v1_2>; rel="next""#,
        server.uri()
    );
    Mock::given(method("GET"))
        .and(path("/app/hook/deliveries"))
        .and(AppJwt)
        .and(query_param("cursor", "v1_2"))
        .respond_with(
            ResponseTemplate::new(200)
                // Older than `since`: the listing stops here.
                .insert_header(
                    "link",
                    r#"<https://x/app/hook/deliveries?cursor=v1_1>; rel="next""#,
                )
                .set_body_json(json!([attempt(2, "b", 5, 200), attempt(1, "a", 1, 503)])),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/app/hook/deliveries"))
        .and(AppJwt)
        .and(query_param("per_page", "100"))
        .and(NoCursor)
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("link", next.as_str())
                .set_body_json(json!([attempt(4, "d", 9, 503), attempt(3, "c", 8, 0)])),
        )
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = app_github(&server);

    let since = Utc.with_ymd_and_hms(2026, 12, 1, 10, 3, 0).unwrap();
    let log = github
        .hook_deliveries(&WebhookSource::App, since)
        .await
        .unwrap();

    let ids: Vec<i64> = log.iter().map(|d| d.id).collect();
    assert_eq!(ids, [4, 3, 2], "newest first, nothing before since");
    assert_eq!(log[1].status_code, 0);
    assert!(!log[0].succeeded() && log[2].succeeded());
    assert_eq!(
        recorder.requests(),
        vec![("list_hook_deliveries", 200), ("list_hook_deliveries", 200)]
    );
}

#[tokio::test]
async fn an_org_hook_is_redelivered_with_the_token() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/orgs/acme/hooks/77/deliveries"))
        .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([attempt(5, "e", 2, 503)])))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/orgs/acme/hooks/77/deliveries/5/attempts"))
        .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
        .respond_with(ResponseTemplate::new(202).set_body_json(json!({})))
        .expect(1)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);
    let hook = WebhookSource::OrgHook {
        org: "acme".into(),
        hook_id: 77,
    };

    let log = github
        .hook_deliveries(&hook, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap())
        .await
        .unwrap();
    assert_eq!(log.len(), 1);
    github.redeliver(&hook, log[0].id).await.unwrap();
    assert_eq!(
        recorder.requests(),
        vec![
            ("list_hook_deliveries", 200),
            ("redeliver_hook_delivery", 202)
        ]
    );
}

#[tokio::test]
async fn the_apps_hook_needs_app_auth() {
    let server = MockServer::start().await;
    let (github, recorder) = token_github(&server);
    let err = github.redeliver(&WebhookSource::App, 5).await.unwrap_err();
    assert!(matches!(err, GitHubError::Refused(_)), "{err:?}");
    assert!(recorder.requests().is_empty());
}
