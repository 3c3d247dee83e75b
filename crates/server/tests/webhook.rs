//! `POST /webhook` end to end: the real service, a real PostgreSQL, signed
//! deliveries of GitHub's payload shape.

mod common;

use std::time::Duration;

use common::{fixture_bytes, job_payload, spawn_app, spawn_app_with_secrets, SECRET};
use reqwest::StatusCode;
use spot_runners_domain::webhook::sign;

const KANI: &[&str] = &["self-hosted", "Linux", "X64", "spot", "kani"];

async fn outcome(res: reqwest::Response) -> (StatusCode, String) {
    let status = res.status();
    let body: serde_json::Value = res.json().await.unwrap();
    let text = body["outcome"]
        .as_str()
        .or(body["error"].as_str())
        .unwrap_or_default();
    (status, text.to_owned())
}

#[tokio::test]
async fn ping_is_answered_200_and_github_vector_verifies() {
    let app = spawn_app().await;
    let body = fixture_bytes("ping.json");
    let (status, text) = outcome(app.deliver("ping", "d-ping", &body).await).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "pong"));

    // GitHub's published example: this secret, "Hello, World!", this digest.
    let res = app
        .deliver_signed(
            "ping",
            "d-vector",
            b"Hello, World!",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn queued_job_is_recorded_and_matched() {
    let app = spawn_app().await;
    app.insert_profile("kani-medium", &["linux", "x64", "spot", "kani"])
        .await;
    app.eventually("profile reload", || async {
        !app.state.profiles.get().profiles.is_empty()
    })
    .await;

    let res = app
        .deliver("workflow_job", "d-1", &job_payload("queued", 1001, KANI))
        .await;
    assert_eq!(
        outcome(res).await,
        (StatusCode::ACCEPTED, "accepted".into())
    );
    let job = app.job(1001).await.expect("job recorded");
    assert_eq!(job.status, "queued");
    assert_eq!(job.profile.as_deref(), Some("kani-medium"));
    assert_eq!(job.match_error, None);
    assert_eq!(job.org.as_deref(), Some("octo-org"));
    assert_eq!(app.count("webhook_deliveries").await, 1);

    // A job no profile fits is recorded with the reason.
    let res = app
        .deliver(
            "workflow_job",
            "d-2",
            &job_payload("queued", 1002, &["ubuntu-latest"]),
        )
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let job = app.job(1002).await.unwrap();
    assert_eq!(job.profile, None);
    assert!(job.match_error.unwrap().contains("ubuntu-latest"));
    app.stop().await;
}

#[tokio::test]
async fn profile_edits_apply_without_restart() {
    let app = spawn_app().await;
    app.deliver("workflow_job", "d-a", &job_payload("queued", 1, KANI))
        .await;
    assert_eq!(app.job(1).await.unwrap().profile, None);

    app.insert_profile("kani", &["linux", "x64", "spot", "kani"])
        .await;
    app.eventually("profile reload via NOTIFY", || async {
        app.state.profiles.get().profiles.len() == 1
    })
    .await;
    app.deliver("workflow_job", "d-b", &job_payload("queued", 2, KANI))
        .await;
    assert_eq!(app.job(2).await.unwrap().profile.as_deref(), Some("kani"));

    sqlx::query("UPDATE instance_profiles SET enabled = false WHERE name = 'kani'")
        .execute(app.db.store.pool())
        .await
        .unwrap();
    app.eventually("disable applied", || async {
        app.state.profiles.get().profiles.iter().all(|p| !p.enabled)
    })
    .await;
    app.deliver("workflow_job", "d-c", &job_payload("queued", 3, KANI))
        .await;
    let job = app.job(3).await.unwrap();
    assert_eq!(job.profile, None);
    assert!(job.match_error.unwrap().contains("disabled"));
    app.stop().await;
}

#[tokio::test]
async fn duplicates_change_nothing() {
    let app = spawn_app().await;
    let queued = job_payload("queued", 7, KANI);
    assert_eq!(
        outcome(app.deliver("workflow_job", "g-1", &queued).await)
            .await
            .1,
        "accepted"
    );
    let started = job_payload("in_progress", 7, KANI);
    assert_eq!(
        outcome(app.deliver("workflow_job", "g-2", &started).await)
            .await
            .1,
        "accepted"
    );
    // GitHub redelivers with the same GUID.
    let (status, text) = outcome(app.deliver("workflow_job", "g-1", &queued).await).await;
    assert_eq!((status, text.as_str()), (StatusCode::ACCEPTED, "duplicate"));
    let job = app.job(7).await.unwrap();
    assert_eq!(job.status, "in_progress");
    assert_eq!(job.runner_name.as_deref(), Some("my runner"));
    assert_eq!(app.count("webhook_deliveries").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn reordered_deliveries_never_move_a_job_backwards() {
    let app = spawn_app().await;
    // completed arrives first, then the older events.
    for (guid, action) in [
        ("r-3", "completed"),
        ("r-1", "queued"),
        ("r-2", "in_progress"),
    ] {
        let res = app
            .deliver("workflow_job", guid, &job_payload(action, 9, KANI))
            .await;
        assert_eq!(res.status(), StatusCode::ACCEPTED, "{action}");
    }
    let job = app.job(9).await.unwrap();
    assert_eq!(job.status, "completed", "a completed job is not demand");
    assert_eq!(job.conclusion.as_deref(), Some("success"));
    assert_eq!(job.runner_name.as_deref(), Some("my runner"));
    assert!(
        job.queued_seen,
        "the late queued delivery still records its timestamp"
    );

    // waiting is not demand and is overtaken by queued.
    app.deliver("workflow_job", "w-1", &job_payload("waiting", 10, KANI))
        .await;
    assert_eq!(app.job(10).await.unwrap().status, "waiting");
    app.deliver("workflow_job", "w-2", &job_payload("queued", 10, KANI))
        .await;
    app.deliver("workflow_job", "w-3", &job_payload("waiting", 10, KANI))
        .await;
    assert_eq!(app.job(10).await.unwrap().status, "queued");
    app.stop().await;
}

#[tokio::test]
async fn user_owned_repositories_are_recorded_without_org() {
    let app = spawn_app().await;
    let body = fixture_bytes("workflow_job/queued-user-1.json");
    let res = app.deliver("workflow_job", "u-1", &body).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let id: i64 = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["workflow_job"]["id"]
        .as_i64()
        .unwrap();
    let job = app.job(id).await.unwrap();
    assert_eq!(job.org, None);
    assert!(job.repository.contains('/'));
    app.stop().await;
}

#[tokio::test]
async fn bad_signatures_are_401_and_store_nothing() {
    let app = spawn_app().await;
    let body = job_payload("queued", 11, KANI);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("wrong secret", Some(sign(b"not the secret", &body))),
        ("other body", Some(sign(SECRET.as_bytes(), b"{}"))),
        ("garbage", Some("sha256=nothex".into())),
        ("sha1", Some("sha1=0000".into())),
    ];
    for (what, sig) in cases {
        let mut req = app
            .client
            .post(format!("{}/webhook", app.base))
            .header("X-GitHub-Event", "workflow_job")
            .header("X-GitHub-Delivery", format!("bad-{what}"))
            .header("Content-Type", "application/json")
            .body(body.clone());
        if let Some(sig) = sig {
            req = req.header("X-Hub-Signature-256", sig);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{what}");
    }
    assert_eq!(app.count("webhook_deliveries").await, 0);
    assert_eq!(app.count("workflow_jobs").await, 0);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"spot_runners_webhooks_total{action="",event="workflow_job",outcome="bad_signature"} 5"#),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn rotation_accepts_old_and_new_secrets() {
    let app = spawn_app_with_secrets(&format!("new-secret,{SECRET}")).await;
    let body = job_payload("queued", 12, KANI);
    let res = app
        .deliver_signed("workflow_job", "rot-1", &body, &sign(b"new-secret", &body))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let body = job_payload("queued", 13, KANI);
    let res = app.deliver("workflow_job", "rot-2", &body).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let res = app
        .deliver_signed("workflow_job", "rot-3", &body, &sign(b"retired", &body))
        .await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.count("workflow_jobs").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn malformed_deliveries_are_400_and_store_nothing() {
    let app = spawn_app().await;
    let not_json = b"{not json".to_vec();
    let no_job =
        br#"{"action":"queued","repository":{"full_name":"a/b","owner":{"login":"a"}}}"#.to_vec();
    let wrong_types = br#"{"action":"queued","workflow_job":{"id":"seven","run_id":1,"labels":[]},"repository":{"full_name":"a/b","owner":{"login":"a"}}}"#.to_vec();
    for (what, body) in [
        ("not json", not_json),
        ("no job", no_job),
        ("wrong types", wrong_types),
    ] {
        let res = app
            .deliver("workflow_job", &format!("m-{what}"), &body)
            .await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{what}");
    }
    // A good body without a delivery GUID cannot be de-duplicated.
    let body = job_payload("queued", 14, KANI);
    let res = app
        .client
        .post(format!("{}/webhook", app.base))
        .header("X-GitHub-Event", "workflow_job")
        .header("X-Hub-Signature-256", sign(SECRET.as_bytes(), &body))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    // Form-encoded webhooks are a settings mistake, said plainly.
    let res = app
        .client
        .post(format!("{}/webhook", app.base))
        .header("X-GitHub-Event", "workflow_job")
        .header("X-GitHub-Delivery", "m-form")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("X-Hub-Signature-256", sign(SECRET.as_bytes(), &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert!(res.text().await.unwrap().contains("application/json"));
    assert_eq!(app.count("webhook_deliveries").await, 0);
    assert_eq!(app.count("workflow_jobs").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn other_events_and_actions_are_accepted_and_ignored() {
    let app = spawn_app().await;
    let res = app
        .deliver("push", "o-1", br#"{"ref":"refs/heads/main"}"#)
        .await;
    assert_eq!(outcome(res).await, (StatusCode::ACCEPTED, "ignored".into()));
    let mut v: serde_json::Value =
        serde_json::from_slice(&job_payload("queued", 15, KANI)).unwrap();
    v["action"] = "some_future_action".into();
    let res = app
        .deliver("workflow_job", "o-2", &serde_json::to_vec(&v).unwrap())
        .await;
    assert_eq!(outcome(res).await, (StatusCode::ACCEPTED, "ignored".into()));
    assert_eq!(app.count("workflow_jobs").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = spawn_app().await;
    let big = vec![b' '; 25 * 1024 * 1024 + 1];
    let res = app
        .client
        .post(format!("{}/webhook", app.base))
        .header("X-GitHub-Event", "workflow_job")
        .header("X-GitHub-Delivery", "big")
        .header("X-Hub-Signature-256", sign(SECRET.as_bytes(), &big))
        .body(big)
        .send()
        .await;
    // The server may answer before reading it all and close the connection.
    if let Ok(res) = res {
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    assert_eq!(app.count("webhook_deliveries").await, 0);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains(r#"outcome="too_large"} 1"#), "{metrics}");
    app.stop().await;
}

#[tokio::test]
async fn unwritable_ledger_is_503_and_the_redelivery_is_processed() {
    let app = spawn_app().await;
    // Another session holds the deliveries table: writes block until the
    // service's own deadline gives up.
    let blocker = app
        .hold("LOCK TABLE webhook_deliveries IN ACCESS EXCLUSIVE MODE")
        .await;
    let body = job_payload("queued", 16, KANI);
    let started = tokio::time::Instant::now();
    let res = app.deliver("workflow_job", "u-503", &body).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered within GitHub's timeout"
    );
    blocker.rollback().await.unwrap();

    // Not recorded as seen: the redelivery (same GUID) is processed normally.
    let (status, text) = outcome(app.deliver("workflow_job", "u-503", &body).await).await;
    assert_eq!((status, text.as_str()), (StatusCode::ACCEPTED, "accepted"));
    assert_eq!(app.job(16).await.unwrap().status, "queued");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains(r#"outcome="unavailable"} 1"#), "{metrics}");
    app.stop().await;
}

#[tokio::test]
async fn a_burst_of_concurrent_deliveries_is_all_recorded() {
    let app = spawn_app().await;
    let sends = (0..300i64).map(|i| {
        let app = &app;
        async move {
            let body = job_payload("queued", 50_000 + i, KANI);
            app.deliver("workflow_job", &format!("burst-{i}"), &body)
                .await
                .status()
        }
    });
    let statuses = futures::future::join_all(sends).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::ACCEPTED));
    assert_eq!(app.count("workflow_jobs").await, 300);
    assert_eq!(app.count("webhook_deliveries").await, 300);
    app.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
    assert_eq!(app.get("/readyz").await.status(), StatusCode::OK);
    app.deliver("workflow_job", "h-1", &job_payload("queued", 17, KANI))
        .await;
    let res = app.get("/metrics").await;
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = res.text().await.unwrap();
    assert!(text.contains(
        r#"spot_runners_webhooks_total{action="queued",event="workflow_job",outcome="accepted"} 1"#
    ));

    // The database going away makes the service unready, not dead.
    let db_name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(app.db.store.pool())
        .await
        .unwrap();
    app.db.store.pool().close().await;
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&app.db.admin_url)
        .await
        .unwrap();
    sqlx::query(&format!("ALTER DATABASE {db_name} ALLOW_CONNECTIONS false"))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&db_name)
        .execute(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        app.get("/readyz").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_completed_workflow_run_is_recorded_once_other_actions_ignored() {
    let app = spawn_app().await;
    let body = fixture_bytes("workflow_run/completed-org-2.json");
    let (status, text) = outcome(app.deliver("workflow_run", "r-1", &body).await).await;
    assert_eq!((status, text.as_str()), (StatusCode::ACCEPTED, "accepted"));
    let row: (i64, String, i32, String, Option<String>) =
        sqlx::query_as("SELECT id, repository, run_attempt, status, conclusion FROM workflow_runs")
            .fetch_one(app.db.store.pool())
            .await
            .unwrap();
    assert_eq!(
        row,
        (
            289782451,
            "octo-org/octo-repo".into(),
            1,
            "completed".into(),
            Some("success".into())
        )
    );
    // GitHub's redelivery keeps its GUID: nothing changes.
    let (status, text) = outcome(app.deliver("workflow_run", "r-1", &body).await).await;
    assert_eq!((status, text.as_str()), (StatusCode::ACCEPTED, "duplicate"));
    // `completed` is the action; the user-repository example's body still
    // says `queued`, and it is recorded completed all the same.
    let body = fixture_bytes("workflow_run/completed-user-1.json");
    app.deliver("workflow_run", "r-2", &body).await;
    let status: String =
        sqlx::query_scalar("SELECT status FROM workflow_runs WHERE id = 1589141559")
            .fetch_one(app.db.store.pool())
            .await
            .unwrap();
    assert_eq!(status, "completed");
    // `requested` changes nothing.
    let body = fixture_bytes("workflow_run/requested-org-4.json");
    let (status, text) = outcome(app.deliver("workflow_run", "r-3", &body).await).await;
    assert_eq!((status, text.as_str()), (StatusCode::ACCEPTED, "ignored"));
    assert_eq!(app.count("workflow_runs").await, 2);
    // A body that is not a workflow_run is 400 and stores nothing.
    let res = app
        .deliver("workflow_run", "r-4", br#"{"action":"completed"}"#)
        .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(app.count("workflow_runs").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn a_delivery_stuck_behind_a_row_lock_does_not_hold_up_the_others() {
    let app = spawn_app().await;
    let res = app
        .deliver("workflow_job", "l-1", &job_payload("queued", 71, KANI))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    // Another session holds job 71's row, so the transaction that records
    // its next delivery waits on the lock.
    let blocker = app
        .hold("SELECT 1 FROM workflow_jobs WHERE id = 71 FOR UPDATE")
        .await;
    let stuck = {
        let body = job_payload("in_progress", 71, KANI);
        let app = &app;
        async move { app.deliver("workflow_job", "l-2", &body).await.status() }
    };
    let others = async {
        app.until_waiting_on_a_lock("the stuck delivery's transaction waits on the lock")
            .await;
        // Deliveries of other jobs are recorded while it waits.
        for i in 0..3 {
            let res = app
                .deliver(
                    "workflow_job",
                    &format!("l-other-{i}"),
                    &job_payload("queued", 80 + i, KANI),
                )
                .await;
            assert_eq!(res.status(), StatusCode::ACCEPTED);
            assert_eq!(app.job(80 + i).await.unwrap().status, "queued");
        }
        blocker.rollback().await.unwrap();
    };
    let (stuck, ()) = tokio::join!(stuck, others);
    // Once the lock is gone the stuck one is recorded too.
    assert_eq!(stuck, StatusCode::ACCEPTED);
    assert_eq!(app.job(71).await.unwrap().status, "in_progress");
    app.stop().await;
}
