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

/// A GET of `at` (with `?status=` for a runs listing), asked with
/// `If-None-Match: if_none_match`, or unconditionally.
fn get(at: &str, status: Option<&str>, if_none_match: Option<&str>) -> wiremock::MockBuilder {
    let mut mock = Mock::given(method("GET")).and(path(at));
    if let Some(status) = status {
        mock = mock.and(query_param("status", status));
    }
    match if_none_match {
        Some(etag) => mock.and(header("if-none-match", etag)),
        None => mock.and(Unconditional),
    }
}

/// A poll for lost `queued` jobs: the runs listings and each open run's
/// jobs are asked for conditionally; a 304 is answered from the cache, and
/// the jobs of a run that is no longer open are forgotten.
#[tokio::test]
async fn a_poll_asks_conditionally_and_forgets_runs_that_closed() {
    let server = MockServer::start().await;
    let runs = |ids: &[i64], etag: &str| {
        let runs: Vec<_> = ids.iter().map(|id| json!({"id": id})).collect();
        ResponseTemplate::new(200)
            .insert_header("etag", etag)
            .set_body_json(json!({"total_count": ids.len(), "workflow_runs": runs}))
    };
    let job = |id: i64, run: i64, status: &str| {
        json!({
            "id": id, "run_id": run, "run_attempt": 1, "status": status,
            "name": format!("proof {id}"), "labels": ["self-hosted", "kani"]
        })
    };
    let jobs = |list: Vec<serde_json::Value>, etag: &str| {
        ResponseTemplate::new(200)
            .insert_header("etag", etag)
            .set_body_json(json!({"total_count": list.len(), "jobs": list}))
    };
    const RUNS: &str = "/repos/acme/app/actions/runs";
    const RUN_11: &str = "/repos/acme/app/actions/runs/11/jobs";
    const RUN_12: &str = "/repos/acme/app/actions/runs/12/jobs";
    // Queued runs: [11], unchanged once, then [] (run 11 started), then
    // [11] again (a re-run of it).
    get(RUNS, Some("queued"), None)
        .respond_with(runs(&[11], r#""q1""#))
        .expect(1)
        .mount(&server)
        .await;
    get(RUNS, Some("queued"), Some(r#""q1""#))
        .respond_with(ResponseTemplate::new(304))
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&server)
        .await;
    get(RUNS, Some("queued"), Some(r#""q1""#))
        .respond_with(runs(&[], r#""q2""#))
        .expect(1)
        .mount(&server)
        .await;
    get(RUNS, Some("queued"), Some(r#""q2""#))
        .respond_with(runs(&[11], r#""q3""#))
        .expect(1)
        .mount(&server)
        .await;
    // Running runs: [12] throughout.
    get(RUNS, Some("in_progress"), None)
        .respond_with(runs(&[12], r#""p1""#))
        .expect(1)
        .mount(&server)
        .await;
    get(RUNS, Some("in_progress"), Some(r#""p1""#))
        .respond_with(ResponseTemplate::new(304))
        .expect(3)
        .mount(&server)
        .await;
    // Run 11's jobs: asked unconditionally again once it was forgotten.
    get(RUN_11, None, None)
        .respond_with(jobs(vec![job(1, 11, "queued")], r#""j11""#))
        .expect(2)
        .mount(&server)
        .await;
    get(RUN_11, None, Some(r#""j11""#))
        .respond_with(ResponseTemplate::new(304))
        .expect(1)
        .mount(&server)
        .await;
    // Run 12: a matrix; its waiting job starts between the first two polls.
    let matrix =
        |second: &str, etag: &str| jobs(vec![job(2, 12, "in_progress"), job(3, 12, second)], etag);
    get(RUN_12, None, None)
        .respond_with(matrix("queued", r#""j12a""#))
        .expect(1)
        .mount(&server)
        .await;
    get(RUN_12, None, Some(r#""j12a""#))
        .respond_with(matrix("in_progress", r#""j12b""#))
        .expect(1)
        .mount(&server)
        .await;
    get(RUN_12, None, Some(r#""j12b""#))
        .respond_with(ResponseTemplate::new(304))
        .expect(2)
        .mount(&server)
        .await;
    let (github, recorder) = token_github(&server);
    let poll = || async {
        let queued = github.queued_jobs("acme/app").await.unwrap();
        queued.iter().map(|j| j.id).collect::<Vec<_>>()
    };

    assert_eq!(poll().await, [1, 3]);
    assert_eq!(poll().await, [1], "run 11 from the cache; job 3 started");
    assert_eq!(poll().await, Vec::<i64>::new());
    assert_eq!(poll().await, [1], "run 11's jobs listed afresh");
    let (runs, jobs) = ("list_workflow_runs", "list_jobs_for_run");
    assert_eq!(
        recorder.requests(),
        vec![
            (runs, 200),
            (runs, 200),
            (jobs, 200),
            (jobs, 200),
            (runs, 304),
            (runs, 304),
            (jobs, 304),
            (jobs, 200),
            (runs, 200),
            (runs, 304),
            (jobs, 304),
            (runs, 200),
            (runs, 304),
            (jobs, 200),
            (jobs, 304),
        ]
    );
}
