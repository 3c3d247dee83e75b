//! Through the running service (HTTP on port 0, a real PostgreSQL, the
//! fake cloud and GitHub behind the ports, a clock the test moves): the
//! stuck-job gauge rises while a job waits, a webhook `ping` teaches the
//! service the org it may keep a warm pool in, and token auth without
//! `SPOT_RUNNERS_GITHUB_ORGS` refuses to start a warm pool it cannot place.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{job_payload, spawn_app_with_clock, TestApp, SECRET};
use serde_json::json;
use spot_runners_domain::Market;
use spot_runners_reconciler::Backends;
use spot_runners_sim::{FakeCloud, FakeGitHub, ManualClock};

struct World {
    app: TestApp,
    cloud: FakeCloud,
    github: FakeGitHub,
    clock: ManualClock,
}

async fn world() -> World {
    let cloud = FakeCloud::with_seed(1);
    let github = FakeGitHub::with_seed(1);
    let clock = ManualClock::new();
    let app = spawn_app_with_clock(
        SECRET,
        |s| s.reconcile_interval = Duration::from_secs(1),
        Some(Backends {
            cloud: Arc::new(cloud.clone()),
            github: Arc::new(github.clone()),
            parameters: Arc::new(spot_runners_sim::FakeParameterStore::new()),
        }),
        Arc::new(clock.clone()),
    )
    .await;
    World {
        app,
        cloud,
        github,
        clock,
    }
}

/// `spot_runners_oldest_queued_job_seconds{profile}` as /metrics shows it.
async fn oldest_queued(app: &TestApp, profile: &str) -> Option<i64> {
    let text = app.get("/metrics").await.text().await.unwrap();
    let prefix = format!("spot_runners_oldest_queued_job_seconds{{profile=\"{profile}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn the_oldest_queued_job_gauge_rises_while_a_job_waits() {
    let w = world().await;
    // No capacity anywhere the profile may launch: the job waits.
    w.cloud
        .set_capacity("c6i.4xlarge", None, Market::Spot, Some(0));
    w.app
        .insert_profile("kani", &["linux", "x64", "kani"])
        .await;
    sqlx::query("UPDATE instance_profiles SET on_demand_fallback = false")
        .execute(w.app.db.store.pool())
        .await
        .unwrap();
    let profiles = w.app.state.profiles.clone();
    w.app
        .eventually("the profile to be loaded", || {
            let p = profiles.get();
            async move { p.profiles.iter().any(|p| !p.on_demand_fallback) }
        })
        .await;
    let body = job_payload("queued", 4242, &["self-hosted", "linux", "x64", "kani"]);
    assert_eq!(
        w.app.deliver("workflow_job", "d-1", &body).await.status(),
        202
    );

    let app = &w.app;
    app.eventually("the gauge to show the queued job", || async {
        oldest_queued(app, "kani").await.is_some_and(|s| s < 60)
    })
    .await;
    w.clock.advance(Duration::from_secs(600));
    app.eventually("the gauge to rise with the clock", || async {
        oldest_queued(app, "kani").await.is_some_and(|s| s >= 600)
    })
    .await;
    app.eventually("a launch attempt (refused for capacity)", || async {
        w.cloud.launch_attempts() > 0
    })
    .await;
    assert_eq!(w.cloud.live_count(None), 0);
    w.app.stop().await;
}

/// An org webhook's `ping` (GitHub sends one when the hook is created)
/// names the org: a profile with `min_idle = 2` gets its two warm runners
/// there before any job has arrived.
#[tokio::test]
async fn a_ping_names_the_org_a_warm_pool_is_kept_in() {
    let w = world().await;
    w.app
        .insert_profile("kani", &["linux", "x64", "kani"])
        .await;
    sqlx::query("UPDATE instance_profiles SET min_idle = 2")
        .execute(w.app.db.store.pool())
        .await
        .unwrap();
    let ping = serde_json::to_vec(&json!({
        "zen": "Design for failure.",
        "hook_id": 1,
        "hook": {"type": "Organization", "id": 1, "events": ["workflow_job"]},
        "organization": {"login": "acme", "id": 99},
        "sender": {"login": "admin", "id": 1}
    }))
    .unwrap();
    // Nothing is launched before the ping: no scope is known.
    let profiles = w.app.state.profiles.clone();
    w.app
        .eventually("the profile to be loaded", || {
            let p = profiles.get();
            async move { p.profiles.iter().any(|p| p.min_idle == 2) }
        })
        .await;
    assert_eq!(w.cloud.launch_attempts(), 0);

    assert_eq!(w.app.deliver("ping", "d-ping", &ping).await.status(), 200);
    let cloud = w.cloud.clone();
    w.app
        .eventually("two warm runners", || {
            let n = cloud.live_count(Some("kani"));
            async move { n == 2 }
        })
        .await;
    assert!(w
        .github
        .runners()
        .iter()
        .all(|g| g.scope == spot_runners_domain::ports::RunnerScope::Org("acme".into())));
    // An unsigned ping teaches nothing: checked by the signature first.
    let _ = w.clock.clone();
    w.app.stop().await;
}

#[tokio::test]
async fn token_auth_with_a_warm_pool_and_no_orgs_is_a_clear_error() {
    use spot_runners::configuration::GitHubAuth;
    use spot_runners::startup::Application;
    let db = spot_runners_store::testing::test_database().await.unwrap();
    sqlx::query(
        "INSERT INTO instance_profiles (name, labels, instance_types, image_id, subnet_ids, min_idle)
         VALUES ('kani', '{kani}', '{c6i.4xlarge}', 'ami-0123456789abcdef0', '{}', 1)",
    )
    .execute(db.store.pool())
    .await
    .unwrap();
    let mut settings = common::settings(&db, SECRET);
    settings.github_auth = GitHubAuth::Token(secrecy::SecretString::from("ghp_x"));
    let metrics = Arc::new(spot_runners::metrics::Metrics::new().unwrap());
    let err = Application::build_with(settings.clone(), Arc::clone(&metrics), None)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("SPOT_RUNNERS_GITHUB_ORGS"), "{err}");
    assert!(err.contains("kani"), "{err}");

    settings.github_orgs = vec![spot_runners_domain::ports::RunnerScope::Org("acme".into())];
    let app = Application::build_with(settings, metrics, None).await;
    assert!(app.is_ok(), "with the orgs configured it starts");
}
