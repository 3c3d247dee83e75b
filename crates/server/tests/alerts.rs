//! Every alert in `deploy/prometheus/alerts.yml` can fire: for each rule a
//! test drives the running service (on the fake cloud and fake GitHub, or
//! the real GitHub adapter against an HTTP mock) into the rule's condition
//! and reads the metric the rule reads from `/metrics`, as Prometheus
//! scrapes it. Promtool's tests (`alerts.test.yml`) then cover the rule's
//! arithmetic on such series. Time moves because the test moves the clock.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{job_payload, spawn_app, spawn_app_on, TestApp, SECRET};
use secrecy::SecretString;
use spot_runners::metrics::Metrics;
use spot_runners_domain::ports::{Cloud, GitHubJob, JobReport};
use spot_runners_domain::Market;
use spot_runners_github::{Auth, GitHubConfig, OctocrabGitHub};
use spot_runners_reconciler::Backends;
use spot_runners_sim::{FakeCloud, FakeGitHub, ManualClock};

const MINUTE: Duration = Duration::from_secs(60);
const LABELS: &[&str] = &["self-hosted", "linux", "x64", "kani"];
/// The repository of the fixture payloads.
const REPOSITORY: &str = "octo-org/example-workflow";

/// Each alert and the test (`file::function`) that drives the service into it.
const ALERT_TESTS: &[(&str, &str)] = &[
    (
        "SpotRunnersJobQueuedTooLong",
        "alerts.rs::job_queued_too_long",
    ),
    ("SpotRunnersJobWaitP95High", "alerts.rs::job_wait_p95_high"),
    (
        "SpotRunnersLaunchErrorsRising",
        "alerts.rs::launch_errors_rising",
    ),
    (
        "SpotRunnersLaunchMisconfigured",
        "alerts.rs::launch_misconfigured",
    ),
    (
        "SpotRunnersProfileCannotLaunch",
        "alerts.rs::profile_cannot_launch",
    ),
    ("SpotRunnersBootTimeouts", "alerts.rs::boot_timeouts"),
    (
        "SpotRunnersInterruptionRateHigh",
        "alerts.rs::interruption_rate_high",
    ),
    ("SpotRunnersOrphansFound", "alerts.rs::orphans_found"),
    ("SpotRunnersInvalidProfiles", "alerts.rs::invalid_profiles"),
    (
        "SpotRunnersWebhookSignatureFailures",
        "alerts.rs::webhook_signature_failures",
    ),
    (
        "SpotRunnersWebhookUnavailable",
        "webhook.rs::unwritable_ledger_is_503_and_the_redelivery_is_processed",
    ),
    (
        "SpotRunnersLostWebhooksRepaired",
        "alerts.rs::lost_webhooks_repaired",
    ),
    ("SpotRunnersDown", "alerts.rs::down"),
    (
        "SpotRunnersReconcileFailing",
        "alerts.rs::reconcile_failing",
    ),
    (
        "SpotRunnersReconcileStalled",
        "alerts.rs::reconcile_stalled",
    ),
    (
        "SpotRunnersGithubRateLimitLow",
        "alerts.rs::github_rate_limit_low",
    ),
    ("SpotRunnersGithubErrors", "alerts.rs::github_errors"),
    ("SpotRunnersSpendHigh", "alerts.rs::spend_high"),
    (
        "SpotRunnersDailySpendCapReached",
        "alerts.rs::daily_spend_cap_reached",
    ),
    (
        "SpotRunnersJobLost",
        "reruns.rs::refusals_are_retried_later_or_given_up_with_a_reason_never_in_a_loop",
    ),
];

/// Alerts on a metric the service does not set yet, and why. Each one here
/// is an alert that cannot fire: the list must shrink, never grow quietly.
const ALERTS_ON_UNSET_METRICS: &[(&str, &str)] = &[];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|n| n.trim().to_owned())
        .collect()
}

#[test]
fn every_alert_has_a_test_that_makes_it_fire() {
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let in_rules: BTreeSet<String> = alert_names(&rules).into_iter().collect();
    let covered: BTreeSet<String> = ALERT_TESTS
        .iter()
        .chain(ALERTS_ON_UNSET_METRICS)
        .map(|(a, _)| (*a).to_owned())
        .collect();
    assert_eq!(
        in_rules, covered,
        "each alert in alerts.yml needs an entry in ALERT_TESTS (or, honestly, ALERTS_ON_UNSET_METRICS)"
    );
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    for (alert, test) in ALERT_TESTS {
        let (file, function) = test.split_once("::").unwrap();
        let source = std::fs::read_to_string(tests.join(file)).unwrap();
        assert!(
            source.contains(&format!("async fn {function}()")),
            "{alert}: tests/{file} has no test {function}"
        );
    }
}

/// GitHub's anchor for a Markdown heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_alert_links_a_runbook_section_that_exists() {
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let docs = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let anchors: BTreeSet<String> = docs
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect();
    let urls: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .collect();
    assert_eq!(
        urls.len(),
        alert_names(&rules).len(),
        "every alert carries a runbook_url"
    );
    for url in urls {
        let anchor = url
            .strip_prefix("docs/operations.md#")
            .unwrap_or_else(|| panic!("{url} does not point into docs/operations.md"));
        assert!(
            anchors.contains(anchor),
            "{url}: docs/operations.md has no such heading"
        );
    }
}

// ------------------------------------------------------------ scraping ----

/// The sum of the samples of `name` whose labels include `labels`, in a
/// Prometheus text exposition (0 when there is none).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let have: Vec<(String, String)> = split_labels(label_text);
        if labels
            .iter()
            .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
        {
            total += value.parse::<f64>().unwrap();
        }
    }
    total
}

fn split_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((key, tail)) = rest.split_once("=\"") {
        let end = tail.find('"').expect("label value closes");
        out.push((
            key.trim_start_matches(',').to_owned(),
            tail[..end].to_owned(),
        ));
        rest = &tail[end + 1..];
    }
    out
}

async fn scrape(app: &TestApp) -> String {
    let res = app.get("/metrics").await;
    assert_eq!(res.status(), 200);
    res.text().await.unwrap()
}

/// Scrapes until `name{labels}` satisfies `ok`; returns its value.
async fn until(
    app: &TestApp,
    name: &str,
    labels: &[(&str, &str)],
    ok: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(app).await;
        let v = sample(&text, name, labels);
        if ok(v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {name}{labels:?}; it is {v}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Scrapes until the exposition has a sample of `name{labels...}` at all.
async fn until_present(app: &TestApp, series_prefix: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !scrape(app)
        .await
        .lines()
        .any(|l| l.starts_with(series_prefix))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {series_prefix}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ------------------------------------------------------------- fleets ----

/// The running service on the fake cloud and fake GitHub, with a clock the
/// test moves and passes as often as the loop allows.
struct Fleet {
    app: TestApp,
    cloud: FakeCloud,
    github: FakeGitHub,
    clock: ManualClock,
}

async fn fleet() -> Fleet {
    fleet_with(|_| {}).await
}

async fn fleet_with(tweak: impl FnOnce(&mut spot_runners::configuration::Settings)) -> Fleet {
    let cloud = FakeCloud::with_seed(1);
    let github = FakeGitHub::with_seed(1);
    let clock = ManualClock::new();
    let app = spawn_app_on(
        SECRET,
        |s| {
            s.reconcile_interval = Duration::from_millis(50);
            tweak(s);
        },
        Arc::new(Metrics::new().unwrap()),
        Some(Backends {
            cloud: Arc::new(cloud.clone()),
            github: Arc::new(github.clone()),
            parameters: Arc::new(spot_runners_sim::FakeParameterStore::new()),
        }),
        Arc::new(clock.clone()),
    )
    .await;
    Fleet {
        app,
        cloud,
        github,
        clock,
    }
}

/// A `kani` profile, loaded by the service; `sql_set` tweaks the row.
async fn profile(app: &TestApp, sql_set: &str) {
    app.insert_profile("kani", &["linux", "x64", "kani"]).await;
    if !sql_set.is_empty() {
        sqlx::query(&format!(
            "UPDATE instance_profiles SET {sql_set} WHERE name = 'kani'"
        ))
        .execute(app.db.store.pool())
        .await
        .unwrap();
    }
    app.eventually("the profile is loaded", || async {
        !app.state.profiles.get().profiles.is_empty()
    })
    .await;
}

/// A signed `queued` delivery of job `id`; GitHub says it is still queued.
async fn queue(f: &Fleet, id: i64) {
    f.github.set_job(
        REPOSITORY,
        id,
        JobReport {
            status: "queued".into(),
            conclusion: None,
            runner_name: None,
        },
    );
    let body = job_payload("queued", id, LABELS);
    let res = f
        .app
        .deliver("workflow_job", &format!("queued-{id}"), &body)
        .await;
    assert_eq!(res.status(), 202);
}

/// Waits until a runner is booting on an instance; returns (runner, instance).
async fn booting(app: &TestApp) -> (String, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT name, instance_id FROM runners WHERE state = 'booting' LIMIT 1")
                .fetch_optional(app.db.store.pool())
                .await
                .unwrap();
        if let Some(row) = row {
            return row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for a booting runner"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ------------------------------------------------------- one per alert ----

#[tokio::test]
async fn job_queued_too_long() {
    let f = fleet().await;
    profile(&f.app, "max_instances = 5").await;
    queue(&f, 101).await;
    let gauge = "spot_runners_oldest_queued_job_seconds";
    until_present(
        &f.app,
        r#"spot_runners_oldest_queued_job_seconds{profile="kani"}"#,
    )
    .await;
    assert!(sample(&scrape(&f.app).await, gauge, &[("profile", "kani")]) < 600.0);
    f.clock.advance(11 * MINUTE);
    until(&f.app, gauge, &[("profile", "kani")], |v| v > 600.0).await;
    f.app.stop().await;
}

/// Recording jobs only (no GitHub or AWS credentials): nothing launches, so
/// the alert is the one thing that tells the operator.
#[tokio::test]
async fn job_queued_too_long_without_a_reconciler() {
    let app = spawn_app_on(
        SECRET,
        |s| s.reconcile_interval = Duration::from_millis(50),
        Arc::new(Metrics::new().unwrap()),
        None,
        Arc::new(spot_runners_domain::clock::SystemClock),
    )
    .await;
    profile(&app, "").await;
    let body = job_payload("queued", 102, LABELS);
    assert_eq!(
        app.deliver("workflow_job", "queued-102", &body)
            .await
            .status(),
        202
    );
    let gauge = "spot_runners_oldest_queued_job_seconds";
    until_present(
        &app,
        r#"spot_runners_oldest_queued_job_seconds{profile="kani"}"#,
    )
    .await;
    assert!(sample(&scrape(&app).await, gauge, &[("profile", "kani")]) < 600.0);
    // The ledger's record of when the job was first seen, eleven minutes back.
    sqlx::query(
        "UPDATE workflow_jobs SET first_seen_at = first_seen_at - interval '11 minutes' WHERE id = 102",
    )
    .execute(app.db.store.pool())
    .await
    .unwrap();
    until(&app, gauge, &[("profile", "kani")], |v| v > 600.0).await;
    app.stop().await;
}

#[tokio::test]
async fn job_wait_p95_high() {
    let app = spawn_app().await;
    profile(&app, "").await;
    let mut body: serde_json::Value =
        serde_json::from_slice(&job_payload("in_progress", 103, LABELS)).unwrap();
    // GitHub's clock on both ends: created, then started twenty minutes on.
    body["workflow_job"]["created_at"] = "2026-12-01T09:00:00Z".into();
    body["workflow_job"]["started_at"] = "2026-12-01T09:20:00Z".into();
    let res = app
        .deliver(
            "workflow_job",
            "in-progress-103",
            &serde_json::to_vec(&body).unwrap(),
        )
        .await;
    assert_eq!(res.status(), 202);
    let text = scrape(&app).await;
    let count = sample(
        &text,
        "spot_runners_job_wait_seconds_count",
        &[("profile", "kani")],
    );
    let within_10m = sample(
        &text,
        "spot_runners_job_wait_seconds_bucket",
        &[("profile", "kani"), ("le", "600")],
    );
    assert_eq!((count, within_10m), (1.0, 0.0), "{text}");
    app.stop().await;
}

#[tokio::test]
async fn launch_errors_rising() {
    let f = fleet().await;
    profile(&f.app, "").await;
    f.cloud
        .set_capacity_error_rate("c6i.4xlarge", Market::Spot, 1.0);
    queue(&f, 104).await;
    until(
        &f.app,
        "spot_runners_launch_errors_total",
        &[
            ("profile", "kani"),
            ("code", "InsufficientInstanceCapacity"),
        ],
        |v| v >= 1.0,
    )
    .await;
    // The profile falls back to on-demand: capacity, not misconfiguration.
    booting(&f.app).await;
    f.app.stop().await;
}

#[tokio::test]
async fn launch_misconfigured() {
    let f = fleet().await;
    profile(&f.app, "").await;
    f.cloud.fail_next("UnauthorizedOperation");
    queue(&f, 105).await;
    until(
        &f.app,
        "spot_runners_launch_errors_total",
        &[("profile", "kani"), ("code", "UnauthorizedOperation")],
        |v| v >= 1.0,
    )
    .await;
    f.app.stop().await;
}

#[tokio::test]
async fn profile_cannot_launch() {
    let f = fleet().await;
    profile(&f.app, "").await;
    for market in [Market::Spot, Market::OnDemand] {
        f.cloud.set_capacity_error_rate("c6i.4xlarge", market, 1.0);
    }
    queue(&f, 106).await;
    until(
        &f.app,
        "spot_runners_launches_total",
        &[("profile", "kani"), ("outcome", "failed")],
        |v| v >= 2.0,
    )
    .await;
    let text = scrape(&f.app).await;
    assert_eq!(
        sample(
            &text,
            "spot_runners_launches_total",
            &[("profile", "kani"), ("outcome", "launched")]
        ),
        0.0
    );
    f.app.stop().await;
}

/// A broken AMI: the instance runs, its runner never comes online.
#[tokio::test]
async fn boot_timeouts() {
    let f = fleet().await;
    profile(&f.app, "boot_timeout_secs = 600").await;
    queue(&f, 107).await;
    booting(&f.app).await;
    f.clock.advance(11 * MINUTE);
    until(
        &f.app,
        "spot_runners_reaps_total",
        &[("profile", "kani"), ("reason", "boot_timeout")],
        |v| v >= 1.0,
    )
    .await;
    f.app.stop().await;
}

#[tokio::test]
async fn interruption_rate_high() {
    let f = fleet().await;
    profile(&f.app, "").await;
    queue(&f, 108).await;
    let (_, instance) = booting(&f.app).await;
    let launched = scrape(&f.app).await;
    assert_eq!(
        sample(
            &launched,
            "spot_runners_launches_total",
            &[
                ("profile", "kani"),
                ("market", "spot"),
                ("outcome", "launched")
            ]
        ),
        1.0,
        "the rule's denominator"
    );
    assert!(f.cloud.interrupt(&instance));
    f.clock.advance(Duration::from_secs(11));
    until(
        &f.app,
        "spot_runners_reaps_total",
        &[("profile", "kani"), ("reason", "interrupted")],
        |v| v >= 1.0,
    )
    .await;
    f.app.stop().await;
}

#[tokio::test]
async fn orphans_found() {
    let f = fleet().await;
    profile(&f.app, "").await;
    // An instance of this controller that the ledger never heard of.
    f.cloud
        .launch(&common::fleet::launch_request(
            "spot-runners",
            "spot-runners-kani-lost0001",
        ))
        .await
        .unwrap();
    f.clock.advance(Duration::from_secs(11));
    until(
        &f.app,
        "spot_runners_orphans_total",
        &[("kind", "instance")],
        |v| v >= 1.0,
    )
    .await;
    f.app.stop().await;
}

#[tokio::test]
async fn invalid_profiles() {
    let app = spawn_app().await;
    // The constraints let it through; validation does not (blank label).
    sqlx::query(
        "INSERT INTO instance_profiles (name, labels, instance_types, image_id, subnet_ids)
         VALUES ('blank', '{\"  \"}', '{c6i.4xlarge}', 'ami-1', '{}')",
    )
    .execute(app.db.store.pool())
    .await
    .unwrap();
    until(&app, "spot_runners_invalid_profiles", &[], |v| v >= 1.0).await;
    app.stop().await;
}

#[tokio::test]
async fn webhook_signature_failures() {
    let app = spawn_app().await;
    let body = job_payload("queued", 109, LABELS);
    let res = app
        .deliver_signed("workflow_job", "forged-109", &body, "sha256=00")
        .await;
    assert_eq!(res.status(), 401);
    until(
        &app,
        "spot_runners_webhooks_total",
        &[("outcome", "bad_signature")],
        |v| v >= 1.0,
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn lost_webhooks_repaired() {
    let f = fleet().await;
    profile(&f.app, "").await;
    // A delivered job makes the repository one that is polled.
    queue(&f, 110).await;
    booting(&f.app).await;
    // A job whose `queued` delivery never came, created five minutes ago.
    f.github.queue_job(
        REPOSITORY,
        GitHubJob {
            id: 111,
            run_id: 5000,
            run_attempt: 1,
            name: "proof".into(),
            workflow_name: Some("Kani".into()),
            labels: LABELS.iter().map(|l| (*l).to_owned()).collect(),
            html_url: None,
            created_at: Some(
                spot_runners_domain::clock::Clock::now(&f.clock) - chrono::Duration::minutes(5),
            ),
        },
    );
    f.clock.advance(MINUTE + Duration::from_secs(1));
    until(
        &f.app,
        "spot_runners_stale_jobs_total",
        &[("outcome", "discovered")],
        |v| v >= 1.0,
    )
    .await;
    f.app.stop().await;
}

/// `up` is Prometheus's own: 1 while `/metrics` answers, 0 once it does not.
#[tokio::test]
async fn down() {
    let app = spawn_app().await;
    assert!(scrape(&app).await.contains("spot_runners_"));
    let url = format!("{}/metrics", app.base);
    app.stop().await;
    assert!(
        reqwest::get(&url).await.is_err(),
        "a stopped service leaves nothing to scrape"
    );
}

#[tokio::test]
async fn reconcile_failing() {
    let f = fleet().await;
    let passes = "spot_runners_reconcile_passes_total";
    until(&f.app, passes, &[("outcome", "ok")], |v| v >= 1.0).await;
    // The ledger starts refusing the reconciler's writes (every pass settles
    // runners first).
    let pool = f.app.db.store.pool();
    sqlx::query(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'the ledger refuses writes'; END $$",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse BEFORE UPDATE ON runners FOR EACH STATEMENT EXECUTE FUNCTION refuse()",
    )
    .execute(pool)
    .await
    .unwrap();
    until(&f.app, passes, &[("outcome", "error")], |v| v >= 1.0).await;
    sqlx::query("DROP TRIGGER refuse ON runners")
        .execute(pool)
        .await
        .unwrap();
    let ok = sample(&scrape(&f.app).await, passes, &[("outcome", "ok")]);
    until(&f.app, passes, &[("outcome", "ok")], |v| v > ok).await;
    f.app.stop().await;
}

/// A pass that hangs (here on a lock someone holds on the runners table)
/// finishes no pass, while the service still answers scrapes and webhooks.
#[tokio::test]
async fn reconcile_stalled() {
    let f = fleet().await;
    let passes = "spot_runners_reconcile_passes_total";
    until(&f.app, passes, &[], |v| v >= 1.0).await;
    let blocker = f
        .app
        .hold("LOCK TABLE runners IN ACCESS EXCLUSIVE MODE")
        .await;
    f.app
        .until_waiting_on_a_lock("a pass waits for the lock")
        .await;
    let stuck = sample(&scrape(&f.app).await, passes, &[]);
    // The service is up: a webhook is taken and recorded (and wakes the
    // reconciler, which cannot finish its pass).
    profile(&f.app, "").await;
    queue(&f, 112).await;
    f.app
        .eventually("the delivery is recorded", || async {
            f.app.job(112).await.is_some()
        })
        .await;
    assert_eq!(sample(&scrape(&f.app).await, passes, &[]), stuck);
    blocker.rollback().await.unwrap();
    until(&f.app, passes, &[], |v| v > stuck).await;
    f.app.stop().await;
}

/// The real GitHub adapter against an HTTP mock, reporting into the
/// service's metrics; EC2 is the fake cloud.
async fn on_mock_github(github: &wiremock::MockServer) -> Fleet {
    let metrics = Arc::new(Metrics::new().unwrap());
    let observer: Arc<dyn spot_runners_github::ApiObserver> = metrics.clone();
    let adapter = OctocrabGitHub::new(GitHubConfig {
        api_url: github.uri(),
        auth: Auth::Token(SecretString::from("ghs_test".to_owned())),
        metrics: Some(observer),
    })
    .unwrap();
    let cloud = FakeCloud::with_seed(1);
    let clock = ManualClock::new();
    let app = spawn_app_on(
        SECRET,
        |s| s.reconcile_interval = Duration::from_millis(50),
        metrics,
        Some(Backends {
            cloud: Arc::new(cloud.clone()),
            github: Arc::new(adapter),
            parameters: Arc::new(spot_runners_sim::FakeParameterStore::new()),
        }),
        Arc::new(clock.clone()),
    )
    .await;
    Fleet {
        app,
        cloud,
        github: FakeGitHub::with_seed(1),
        clock,
    }
}

fn jit_created(remaining: &str) -> wiremock::ResponseTemplate {
    let reset = (chrono::Utc::now() + chrono::Duration::minutes(30)).timestamp();
    wiremock::ResponseTemplate::new(201)
        .insert_header("x-ratelimit-remaining", remaining)
        .insert_header("x-ratelimit-limit", "5000")
        .insert_header("x-ratelimit-reset", reset.to_string().as_str())
        .set_body_json(serde_json::json!({
            "runner": {"id": 4242, "name": "ignored", "os": "linux", "status": "offline", "busy": false, "labels": []},
            "encoded_jit_config": "eyJhIjoiYiJ9",
        }))
}

const JIT_PATH: &str = "/orgs/octo-org/actions/runners/generate-jitconfig";

#[tokio::test]
async fn github_rate_limit_low() {
    use wiremock::matchers::{method, path};
    let github = wiremock::MockServer::start().await;
    wiremock::Mock::given(method("POST"))
        .and(path(JIT_PATH))
        .respond_with(jit_created("42"))
        .mount(&github)
        .await;
    let f = on_mock_github(&github).await;
    profile(&f.app, "").await;
    let body = job_payload("queued", 113, LABELS);
    f.app.deliver("workflow_job", "queued-113", &body).await;
    until(
        &f.app,
        "spot_runners_github_rate_limit_remaining",
        &[],
        |v| v == 42.0,
    )
    .await;
    // The next sweep paces itself by it: essential spending only.
    until(&f.app, "spot_runners_github_sweep_spending", &[], |v| {
        v == 2.0
    })
    .await;
    f.app.stop().await;
}

#[tokio::test]
async fn github_errors() {
    use wiremock::matchers::{method, path};
    let github = wiremock::MockServer::start().await;
    // Forbidden first (a missing App permission), then an outage, then fine.
    wiremock::Mock::given(method("POST"))
        .and(path(JIT_PATH))
        .respond_with(wiremock::ResponseTemplate::new(403).set_body_json(
            serde_json::json!({"message": "Resource not accessible by integration"}),
        ))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&github)
        .await;
    wiremock::Mock::given(method("POST"))
        .and(path(JIT_PATH))
        .respond_with(wiremock::ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&github)
        .await;
    wiremock::Mock::given(method("POST"))
        .and(path(JIT_PATH))
        .respond_with(jit_created("4000"))
        .mount(&github)
        .await;
    let f = on_mock_github(&github).await;
    profile(&f.app, "").await;
    let body = job_payload("queued", 114, LABELS);
    f.app.deliver("workflow_job", "queued-114", &body).await;
    let requests = "spot_runners_github_api_requests_total";
    for status in ["403", "503"] {
        until(
            &f.app,
            requests,
            &[("endpoint", "generate_jitconfig"), ("status", status)],
            |v| v >= 1.0,
        )
        .await;
        // A refused registration backs the profile off; the next try, which
        // meets the 503, comes once the backoff has passed.
        f.clock
            .advance(spot_runners_domain::backoff::FIRST_DELAY + Duration::from_secs(1));
    }
    f.app.stop().await;
}

/// `SPOT_RUNNERS_METRICS_LISTEN` moves /metrics off the public webhook port;
/// unset, /metrics stays where DESIGN.md puts it (see `down`).
#[tokio::test]
async fn metrics_on_their_own_listener_when_configured() {
    let app = common::spawn_app_with(
        SECRET,
        |s| s.metrics_listen = Some("127.0.0.1:0".parse().unwrap()),
        None,
    )
    .await;
    let metrics_base = app.metrics_base.clone().expect("a metrics listener");
    assert_ne!(metrics_base, app.base);
    let res = reqwest::get(format!("{metrics_base}/metrics"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().contains("spot_runners_"));
    assert_eq!(
        reqwest::get(format!("{metrics_base}/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        app.get("/metrics").await.status(),
        404,
        "not on the public port"
    );
    assert_eq!(app.get("/healthz").await.status(), 200);
    app.stop().await;
}

// ---------------------------------------------------------------- cost ----

/// Pins both markets of the profile's type at `dollars` an hour.
async fn pin_price(app: &TestApp, dollars: f64) {
    sqlx::query(
        "INSERT INTO instance_prices (instance_type, market, dollars_per_hour, source)
         VALUES ('c6i.4xlarge', 'spot', $1, 'operator'), ('c6i.4xlarge', 'on-demand', $1, 'operator')
         ON CONFLICT (instance_type, market) DO UPDATE
             SET dollars_per_hour = EXCLUDED.dollars_per_hour, source = 'operator'",
    )
    .bind(dollars)
    .execute(app.db.store.pool())
    .await
    .unwrap();
}

#[tokio::test]
async fn spend_high() {
    let f = fleet().await;
    profile(&f.app, "max_instances = 5").await;
    let gauge = "spot_runners_estimated_spend_dollars_per_hour";
    pin_price(&f.app, 45.0).await;
    assert_eq!(sample(&scrape(&f.app).await, gauge, &[]), 0.0);
    queue(&f, 301).await;
    booting(&f.app).await;
    // One live instance at $45/h: the fleet's rate is past the $40/h rule.
    until(&f.app, gauge, &[("profile", "kani")], |v| v > 40.0).await;
    f.app.stop().await;
}

#[tokio::test]
async fn daily_spend_cap_reached() {
    let f = fleet_with(|s| s.max_daily_spend = Some(5.0)).await;
    profile(&f.app, "max_instances = 5").await;
    pin_price(&f.app, 60.0).await;
    until(&f.app, "spot_runners_daily_spend_cap_dollars", &[], |v| {
        v == 5.0
    })
    .await;
    queue(&f, 302).await;
    booting(&f.app).await;
    let reached = "spot_runners_spend_cap_reached";
    assert_eq!(sample(&scrape(&f.app).await, reached, &[]), 0.0);
    assert!(f.app.state.spend_gate.allows_launch());
    // Six minutes at $60/h is $6 of today's $5.
    f.clock.advance(6 * MINUTE);
    until(&f.app, reached, &[], |v| v == 1.0).await;
    assert!(!f.app.state.spend_gate.allows_launch());
    assert!(
        sample(
            &scrape(&f.app).await,
            "spot_runners_spend_today_dollars",
            &[]
        ) >= 5.0
    );
    f.app.stop().await;
}
