//! A database outage heals through GitHub's redelivery: the deliveries the
//! service answered 503 are found in the hook's delivery log and asked for
//! again, once each — no repository poll. The real service and PostgreSQL,
//! the real octocrab adapter against a wiremock GitHub, an injected clock.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::{job_payload, spawn_app};
use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::json;
use spot_runners::redelivery::{Redeliverer, ScanReport, EVERY};
use spot_runners_domain::clock::Clock;
use spot_runners_domain::ports::WebhookSource;
use spot_runners_domain::redelivery::Healing;
use spot_runners_github::{Auth, GitHubConfig, OctocrabGitHub};
use spot_runners_sim::ManualClock;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KANI: &[&str] = &["self-hosted", "linux", "x64", "kani"];
const HOOK: &str = "/orgs/octo-org/hooks/77/deliveries";

fn attempt(
    id: i64,
    guid: &str,
    event: &str,
    at: DateTime<Utc>,
    status_code: u16,
) -> serde_json::Value {
    json!({
        "id": id,
        "guid": guid,
        "delivered_at": at.to_rfc3339(),
        "redelivery": false,
        "duration": 5.0,
        "status": "Service Unavailable",
        "status_code": status_code,
        "event": event,
        "action": "queued",
        "installation_id": null,
        "repository_id": 1,
        "throttled_at": null
    })
}

#[tokio::test]
async fn a_two_minute_outage_heals_through_redelivery() {
    let app = spawn_app().await;
    app.insert_profile("kani", &["linux", "x64", "kani"]).await;
    let clock = ManualClock::new();
    let outage_start = clock.now();

    // One delivery gets through before the outage.
    let res = app
        .deliver(
            "workflow_job",
            "g-before",
            &job_payload("queued", 100, KANI),
        )
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);

    // The outage: the ledger cannot be written, deliveries are answered 503.
    let blocker = app
        .hold("LOCK TABLE webhook_deliveries IN ACCESS EXCLUSIVE MODE")
        .await;
    let lost = [("g-lost-1", 101), ("g-lost-2", 102), ("g-operator", 103)];
    let answers = futures::future::join_all(lost.iter().map(|(guid, job)| {
        let app = &app;
        async move {
            app.deliver("workflow_job", guid, &job_payload("queued", *job, KANI))
                .await
                .status()
        }
    }))
    .await;
    assert!(
        answers
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{answers:?}"
    );
    blocker.rollback().await.unwrap();
    assert!(app.job(101).await.is_none(), "a 503 records nothing");

    // An operator already redelivered one of them by hand.
    let res = app
        .deliver(
            "workflow_job",
            "g-operator",
            &job_payload("queued", 103, KANI),
        )
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);

    // GitHub's log of the hook over those two minutes, newest first.
    let t = |secs: i64| outage_start + TimeDelta::seconds(secs);
    let log = json!([
        attempt(9, "g-healed", "workflow_job", t(115), 202),
        attempt(8, "g-push", "push", t(110), 503),
        attempt(7, "g-operator", "workflow_job", t(100), 202),
        attempt(6, "g-healed", "workflow_job", t(90), 503),
        attempt(5, "g-lost-2", "workflow_job", t(120), 503),
        attempt(4, "g-operator", "workflow_job", t(60), 503),
        attempt(3, "g-lost-1", "workflow_job", t(30), 0),
        attempt(2, "g-before", "workflow_job", t(-5), 202),
    ]);
    let github_mock = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(HOOK))
        .respond_with(ResponseTemplate::new(200).set_body_json(log))
        .mount(&github_mock)
        .await;
    for id in [3, 5] {
        Mock::given(method("POST"))
            .and(path(format!("{HOOK}/{id}/attempts")))
            .respond_with(ResponseTemplate::new(202).set_body_json(json!({})))
            .expect(1)
            .named(format!("redeliver {id}"))
            .mount(&github_mock)
            .await;
    }
    Mock::given(method("POST"))
        .and(path_regex(r"/attempts$"))
        .respond_with(ResponseTemplate::new(202))
        .with_priority(10)
        .expect(0)
        .named("any other redelivery")
        .mount(&github_mock)
        .await;

    let github = OctocrabGitHub::new(GitHubConfig {
        api_url: github_mock.uri(),
        auth: Auth::Token(SecretString::from("test-token")),
        metrics: Some(app.metrics()),
    })
    .unwrap();
    let redeliverer = Redeliverer::new(
        Arc::clone(&app.state.store),
        Arc::new(github),
        WebhookSource::OrgHook {
            org: "octo-org".into(),
            hook_id: 77,
        },
        Arc::new(clock.clone()),
        app.metrics(),
        "spot-runners".into(),
        Arc::new(Healing::default()),
    );

    // The next scan, a few minutes after the outage.
    clock.advance(EVERY);
    let report = redeliverer.scan_if_leader().await.unwrap();
    assert_eq!(
        report,
        Some(ScanReport {
            listed: 8,
            requested: 2,
            failed: 0
        })
    );

    // GitHub sends the two again, with their GUIDs: both are recorded.
    for (guid, job) in [("g-lost-1", 101), ("g-lost-2", 102)] {
        let res = app
            .deliver("workflow_job", guid, &job_payload("queued", job, KANI))
            .await;
        assert_eq!(res.status(), StatusCode::ACCEPTED, "{guid}");
        let recorded = app.job(job).await.expect("healed");
        assert_eq!(recorded.status, "queued");
        assert_eq!(recorded.profile.as_deref(), Some("kani"));
    }

    // A later scan finds nothing more to ask for (and never asks twice).
    clock.advance(EVERY);
    let report = redeliverer.scan_if_leader().await.unwrap().unwrap();
    assert_eq!((report.requested, report.failed), (0, 0));

    let requests = github_mock.received_requests().await.unwrap();
    assert!(
        requests
            .iter()
            .all(|r| !r.url.path().starts_with("/repos/")),
        "no repository poll"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"spot_runners_redeliveries_total{outcome="requested"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"spot_runners_github_api_requests_total{endpoint="redeliver_hook_delivery",status="202"} 2"#
        ),
        "{metrics}"
    );
    github_mock.verify().await;
    app.stop().await;
}

#[tokio::test]
async fn a_redelivery_github_refuses_is_asked_for_again_next_scan() {
    let app = spawn_app().await;
    let clock = ManualClock::new();
    let at = clock.now();
    let github_mock = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(HOOK))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([attempt(
            3,
            "g-x",
            "workflow_job",
            at,
            503
        )])))
        .mount(&github_mock)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("{HOOK}/3/attempts")))
        .respond_with(
            ResponseTemplate::new(422).set_body_json(json!({"message": "Validation Failed"})),
        )
        .up_to_n_times(1)
        .expect(1)
        .mount(&github_mock)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("{HOOK}/3/attempts")))
        .respond_with(ResponseTemplate::new(202))
        .expect(1)
        .mount(&github_mock)
        .await;
    let github = OctocrabGitHub::new(GitHubConfig {
        api_url: github_mock.uri(),
        auth: Auth::Token(SecretString::from("test-token")),
        metrics: None,
    })
    .unwrap()
    .with_retries(0, Duration::from_millis(1));
    let redeliverer = Redeliverer::new(
        Arc::clone(&app.state.store),
        Arc::new(github),
        WebhookSource::OrgHook {
            org: "octo-org".into(),
            hook_id: 77,
        },
        Arc::new(clock.clone()),
        app.metrics(),
        "spot-runners".into(),
        Arc::new(Healing::default()),
    );

    let first = redeliverer.scan().await.unwrap();
    assert_eq!((first.requested, first.failed), (0, 1));
    clock.advance(EVERY);
    let second = redeliverer.scan().await.unwrap();
    assert_eq!((second.requested, second.failed), (1, 0));
    clock.advance(EVERY);
    let third = redeliverer.scan().await.unwrap();
    assert_eq!((third.requested, third.failed), (0, 0), "never twice");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"spot_runners_redeliveries_total{outcome="failed"} 1"#),
        "{metrics}"
    );
    github_mock.verify().await;
    app.stop().await;
}
