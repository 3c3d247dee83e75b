//! Cost: `report` over a ledger of priced and unpriced runners, the spot
//! price refresh from the (fake) cloud, and the daily spend cap's gate, on
//! a real PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use spot_runners::configuration::Settings;
use spot_runners::cost_report;
use spot_runners::metrics::Metrics;
use spot_runners::profiles::ProfileCache;
use spot_runners::spend::{SpendGate, SpendWorker};
use spot_runners_domain::clock::Clock;
use spot_runners_domain::cost::ReportBy;
use spot_runners_domain::Market;
use spot_runners_sim::{FakeCloud, ManualClock};
use spot_runners_store::testing::{test_database, TestDatabase};
use spot_runners_store::Store;

const CONTROLLER: &str = "spot-runners";

fn hours(h: f64) -> chrono::Duration {
    chrono::Duration::milliseconds((h * 3_600_000.0) as i64)
}

struct Runner<'a> {
    name: &'a str,
    profile: &'a str,
    instance_type: &'a str,
    market: &'a str,
    state: &'a str,
    launched_at: DateTime<Utc>,
    ended_at: Option<DateTime<Utc>>,
    job_id: Option<i64>,
}

async fn insert_runner(db: &TestDatabase, controller: &str, r: Runner<'_>) {
    sqlx::query(
        "INSERT INTO runners (name, controller_id, profile, state, org, instance_id, instance_type,
                              market, job_id, launched_at, terminated_at)
         VALUES ($1, $2, $3, $4, 'acme', 'i-' || md5($1), $5, $6, $7, $8, $9)",
    )
    .bind(r.name)
    .bind(controller)
    .bind(r.profile)
    .bind(r.state)
    .bind(r.instance_type)
    .bind(r.market)
    .bind(r.job_id)
    .bind(r.launched_at)
    .bind(r.ended_at)
    .execute(db.store.pool())
    .await
    .unwrap();
}

async fn insert_job(
    db: &TestDatabase,
    id: i64,
    repository: &str,
    runner: &str,
    interrupted: Option<&str>,
) {
    sqlx::query(
        "INSERT INTO workflow_jobs (id, run_id, repository, owner, labels, status, profile,
                                    workflow_name, runner_name, interrupted_at, interrupted_runner,
                                    rerun_state)
         VALUES ($1, 7, $2, 'acme', '{kani}', 'completed', 'kani', 'Kani', $3,
                 CASE WHEN $4::text IS NOT NULL THEN now() END,
                 CASE WHEN $4::text IS NOT NULL THEN $3 END, $4)",
    )
    .bind(id)
    .bind(repository)
    .bind(runner)
    .bind(interrupted)
    .execute(db.store.pool())
    .await
    .unwrap();
}

async fn price(db: &TestDatabase, instance_type: &str, market: &str, dollars: f64) {
    sqlx::query(
        "INSERT INTO instance_prices (instance_type, market, dollars_per_hour, source)
         VALUES ($1, $2, $3, 'operator')
         ON CONFLICT (instance_type, market) DO UPDATE
             SET dollars_per_hour = EXCLUDED.dollars_per_hour, source = 'operator'",
    )
    .bind(instance_type)
    .bind(market)
    .bind(dollars)
    .execute(db.store.pool())
    .await
    .unwrap();
}

fn settings(db: &TestDatabase) -> Settings {
    common::settings(db, common::SECRET)
}

/// A small ledger: a spot job, a spot job a reclaim interrupted and its
/// on-demand re-run, an unpriced warm runner, and rows outside the window
/// or of another controller.
async fn ledger(db: &TestDatabase, now: DateTime<Utc>) {
    price(db, "c6i.4xlarge", "spot", 0.20).await; // on-demand 0.68 is seeded
    let r = |name, profile, ty, market, state, from: f64, to: Option<f64>, job| Runner {
        name,
        profile,
        instance_type: ty,
        market,
        state,
        launched_at: now - hours(from),
        ended_at: to.map(|t| now - hours(t)),
        job_id: job,
    };
    insert_runner(
        db,
        CONTROLLER,
        r(
            "spot-runners-kani-a1",
            "kani",
            "c6i.4xlarge",
            "spot",
            "terminated",
            3.0,
            Some(1.0),
            Some(1),
        ),
    )
    .await;
    insert_runner(
        db,
        CONTROLLER,
        r(
            "spot-runners-kani-a2",
            "kani",
            "c6i.4xlarge",
            "spot",
            "interrupted",
            5.0,
            Some(4.0),
            Some(2),
        ),
    )
    .await;
    insert_runner(
        db,
        CONTROLLER,
        r(
            "spot-runners-kani-a3",
            "kani",
            "c6i.4xlarge",
            "on-demand",
            "terminated",
            4.0,
            Some(2.0),
            Some(3),
        ),
    )
    .await;
    insert_runner(
        db,
        CONTROLLER,
        r(
            "spot-runners-bench-b1",
            "bench",
            "c7i.8xlarge",
            "spot",
            "idle",
            2.0,
            None,
            None,
        ),
    )
    .await;
    insert_runner(
        db,
        CONTROLLER,
        r(
            "spot-runners-kani-old",
            "kani",
            "c6i.4xlarge",
            "spot",
            "terminated",
            240.0,
            Some(216.0),
            None,
        ),
    )
    .await;
    insert_runner(
        db,
        "staging",
        r(
            "staging-kani-s1",
            "kani",
            "c6i.4xlarge",
            "spot",
            "terminated",
            3.0,
            Some(1.0),
            None,
        ),
    )
    .await;
    insert_job(db, 1, "acme/proofs", "spot-runners-kani-a1", None).await;
    insert_job(db, 2, "acme/proofs", "spot-runners-kani-a2", Some("rerun")).await;
    insert_job(db, 3, "acme/bench", "spot-runners-kani-a3", None).await;
}

#[tokio::test]
async fn report_prices_every_runner_and_names_what_it_cannot_price() {
    let db = test_database().await.unwrap();
    let now = Utc::now();
    ledger(&db, now).await;
    let text = cost_report::report(
        &db.store,
        &settings(&db),
        chrono::Duration::days(7),
        ReportBy::Profile,
        now,
    )
    .await
    .unwrap();
    let line = |key: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no {key} line in\n{text}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // kani: 2 h + 1 h spot at 0.20, 2 h on-demand at 0.68; 3 h of spot
    // saved 0.48 each; the interrupted hour is lost; one job re-run.
    assert_eq!(
        line("kani"),
        ["kani", "3", "5.0", "$1.96", "$1.44", "$0.20", "1", "1", "0"],
        "{text}"
    );
    assert_eq!(
        line("bench"),
        ["bench", "1", "2.0", "$0.00", "$0.00", "$0.00", "0", "0", "0"],
        "{text}"
    );
    assert_eq!(line("total")[..4], ["total", "4", "7.0", "$1.96"], "{text}");
    assert!(
        text.contains("price unknown for: c7i.8xlarge spot (2.0 instance-hours"),
        "{text}"
    );

    let text = cost_report::report(
        &db.store,
        &settings(&db),
        chrono::Duration::days(7),
        ReportBy::Repository,
        now,
    )
    .await
    .unwrap();
    assert!(text.contains("by repository"), "{text}");
    assert_eq!(
        line_of(&text, "acme/proofs")[..4],
        ["acme/proofs", "2", "3.0", "$0.60"],
        "{text}"
    );
    assert_eq!(
        line_of(&text, "acme/bench")[..4],
        ["acme/bench", "1", "2.0", "$1.36"],
        "{text}"
    );
    assert_eq!(line_of(&text, "(no")[..3], ["(no", "job)", "1"], "{text}");

    // The last 1.5 h clip every runner's hours to the window.
    let text = cost_report::report(
        &db.store,
        &settings(&db),
        hours(1.5),
        ReportBy::Profile,
        now,
    )
    .await
    .unwrap();
    // Only kani-a1's last half hour and bench's 1.5 h are inside.
    assert_eq!(
        line_of(&text, "kani")[..4],
        ["kani", "1", "0.5", "$0.10"],
        "{text}"
    );
}

fn line_of(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(key))
        .unwrap_or_else(|| panic!("no {key} line in\n{text}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn report_rejects_bad_options_with_a_clear_error() {
    for (args, expect) in [
        (vec!["report", "--since", "7x"], "--since \"7x\""),
        (vec!["report", "--since", "0d"], "more than 0"),
        (
            vec!["report", "--by", "team"],
            "repository, workflow or profile",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_spot-runners"))
            .args(&args)
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:9/none")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
}

/// Tomorrow noon UTC on a manual clock, so an hour back and forth stays
/// inside one UTC day.
fn noon_clock() -> ManualClock {
    let clock = ManualClock::new();
    let now = clock.now();
    let noon = spot_runners_domain::cost::utc_day_start(now) + chrono::Duration::hours(36);
    clock.advance((noon - now).to_std().unwrap());
    clock
}

fn worker(
    db: &TestDatabase,
    cloud: Option<FakeCloud>,
    profiles: ProfileCache,
    clock: &ManualClock,
    gate: SpendGate,
) -> (SpendWorker, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new().unwrap());
    let store: Arc<dyn Store> = Arc::new(db.store.clone());
    let worker = SpendWorker::new(
        store,
        cloud.map(|c| Arc::new(c) as Arc<dyn spot_runners_domain::ports::Cloud>),
        profiles,
        Arc::clone(&metrics),
        CONTROLLER.into(),
        Arc::new(clock.clone()),
        gate,
    );
    (worker, metrics)
}

#[tokio::test]
async fn the_gate_closes_past_the_daily_cap_and_opens_the_next_utc_day() {
    let db = test_database().await.unwrap();
    let clock = noon_clock();
    price(&db, "c6i.4xlarge", "spot", 10.0).await;
    insert_runner(
        &db,
        CONTROLLER,
        Runner {
            name: "spot-runners-kani-g1",
            profile: "kani",
            instance_type: "c6i.4xlarge",
            market: "spot",
            state: "busy",
            launched_at: clock.now() - hours(0.25),
            ended_at: None,
            job_id: None,
        },
    )
    .await;
    let gate = SpendGate::new(Some(5.0));
    let (w, metrics) = worker(&db, None, ProfileCache::default(), &clock, gate.clone());
    assert!(!gate.allows_launch(), "closed until today's spend is read");

    let r = w.pass().await.unwrap();
    assert!((r.spent_today - 2.5).abs() < 0.01, "{r:?}");
    assert!(gate.allows_launch());
    assert_eq!(metrics.spend_cap_reached.get(), 0);
    assert!(
        (metrics
            .estimated_spend
            .with_label_values(&["kani", "spot"])
            .get()
            - 10.0)
            .abs()
            < 1e-9
    );

    clock.advance(Duration::from_secs(30 * 60));
    let r = w.pass().await.unwrap();
    assert!((r.spent_today - 7.5).abs() < 0.01, "{r:?}");
    assert!(!gate.allows_launch(), "past the cap nothing new launches");
    assert_eq!(metrics.spend_cap_reached.get(), 1);
    assert!((metrics.spend_today_dollars.get() - 7.5).abs() < 0.01);
    assert_eq!(metrics.daily_spend_cap_dollars.get(), 5.0);

    // The runner ends; a new UTC day starts from nothing.
    sqlx::query("UPDATE runners SET state = 'terminated', terminated_at = $1")
        .bind(clock.now())
        .execute(db.store.pool())
        .await
        .unwrap();
    clock.advance(Duration::from_secs(24 * 3600));
    let r = w.pass().await.unwrap();
    assert_eq!(r.spent_today, 0.0, "{r:?}");
    assert!(gate.allows_launch());
    assert_eq!(metrics.spend_cap_reached.get(), 0);
    assert_eq!(
        metrics
            .estimated_spend
            .with_label_values(&["kani", "spot"])
            .get(),
        0.0
    );
}

#[tokio::test]
async fn spot_prices_are_refreshed_hourly_from_the_cloud_and_pinned_rows_are_kept() {
    let db = test_database().await.unwrap();
    sqlx::query(
        "INSERT INTO instance_profiles (name, labels, instance_types, image_id, subnet_ids)
         VALUES ('kani', '{kani}', '{c6i.4xlarge,m6i.4xlarge,c7i.4xlarge}', 'ami-1', '{}')",
    )
    .execute(db.store.pool())
    .await
    .unwrap();
    price(&db, "m6i.4xlarge", "spot", 0.99).await;
    let profiles = ProfileCache::default();
    profiles
        .reload(&db.store, &Metrics::new().unwrap())
        .await
        .unwrap();
    let cloud = FakeCloud::with_seed(1);
    cloud.set_spot_price("c7i.4xlarge", None);
    let clock = noon_clock();
    let (w, _) = worker(
        &db,
        Some(cloud.clone()),
        profiles,
        &clock,
        SpendGate::unlimited(),
    );

    let spot = |ty: &'static str| {
        let pool = db.store.pool().clone();
        async move {
            sqlx::query_as::<_, (f64, String)>(
                "SELECT dollars_per_hour, source FROM instance_prices WHERE instance_type = $1 AND market = 'spot'",
            )
            .bind(ty)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    };
    w.pass().await.unwrap();
    assert_eq!(cloud.spot_price_calls(), 1);
    assert_eq!(spot("c6i.4xlarge").await, Some((0.20, "ec2".to_owned())));
    assert_eq!(
        spot("m6i.4xlarge").await,
        Some((0.99, "operator".to_owned())),
        "pinned by an operator"
    );
    assert_eq!(
        spot("c7i.4xlarge").await,
        None,
        "no price is no row, never 0"
    );

    cloud.set_spot_price("c6i.4xlarge", Some(0.31));
    w.pass().await.unwrap();
    assert_eq!(cloud.spot_price_calls(), 1, "not again within the hour");
    assert_eq!(spot("c6i.4xlarge").await.unwrap().0, 0.20);

    clock.advance(Duration::from_secs(61 * 60));
    w.pass().await.unwrap();
    assert_eq!(cloud.spot_price_calls(), 2);
    assert_eq!(spot("c6i.4xlarge").await.unwrap().0, 0.31);
}

#[tokio::test]
async fn a_live_instance_without_a_price_is_counted_apart() {
    let db = test_database().await.unwrap();
    let clock = noon_clock();
    insert_runner(
        &db,
        CONTROLLER,
        Runner {
            name: "spot-runners-kani-u1",
            profile: "kani",
            instance_type: "c7i.4xlarge",
            market: "spot",
            state: "idle",
            launched_at: clock.now() - hours(1.0),
            ended_at: None,
            job_id: None,
        },
    )
    .await;
    let (w, metrics) = worker(
        &db,
        None,
        ProfileCache::default(),
        &clock,
        SpendGate::unlimited(),
    );
    let r = w.pass().await.unwrap();
    assert_eq!(r.dollars_per_hour, Some(0.0));
    assert_eq!(metrics.unpriced_instances.get(), 1);
    assert!(
        r.missing_prices
            .contains(&("c7i.4xlarge".to_owned(), Market::Spot)),
        "{r:?}"
    );
}
