//! The intake under strangers: what a request can make the service hold
//! before it is authenticated is bounded (DESIGN.md, HTTP). Raw TCP plays
//! the half-sent and slow requests no well-behaved client would send.

mod common;

use std::time::Duration;

use common::{job_payload, spawn_app_with, SECRET};
use reqwest::StatusCode;
use spot_runners_domain::webhook::sign;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KANI: &[&str] = &["self-hosted", "linux", "x64", "kani"];
/// Bound on every wait for the service to do something.
const PATIENCE: Duration = Duration::from_secs(10);

async fn connect(app: &common::TestApp) -> TcpStream {
    TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .expect("connected")
}

/// A request head for `/webhook` with these extra header lines.
fn head(headers: &[String]) -> Vec<u8> {
    let mut h = String::from("POST /webhook HTTP/1.1\r\nHost: spot-runners\r\n");
    for line in headers {
        h.push_str(line);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// What the service sent before it closed the connection or went quiet
/// past `PATIENCE`: `None` when it sent nothing at all in that time.
async fn answer(stream: &mut TcpStream) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(_) => return None,
        }
    }
    Some(String::from_utf8_lossy(&got).into_owned())
}

/// A signature of the right shape that is not the right one.
fn forged() -> String {
    sign(b"not the secret", b"whatever")
}

#[tokio::test]
async fn ignored_and_unsigned_deliveries_are_answered_from_the_head_alone() {
    let app = spawn_app_with(SECRET, |_| {}, None).await;
    let big = 25 * 1024 * 1024;
    // Each promises 25 MiB and sends none of it: only an answer that does
    // not wait for the body can arrive.
    let cases = [
        (vec!["X-GitHub-Event: push".to_owned()], "HTTP/1.1 202"),
        (
            vec!["X-GitHub-Event: workflow_job".to_owned()],
            "HTTP/1.1 401",
        ),
        (
            vec![
                "X-GitHub-Event: workflow_job".to_owned(),
                "X-Hub-Signature-256: sha256=nothex".to_owned(),
            ],
            "HTTP/1.1 401",
        ),
        (vec![], "HTTP/1.1 400"),
    ];
    for (headers, expected) in cases {
        let mut headers = headers;
        headers.push("Content-Type: application/json".into());
        headers.push(format!("Content-Length: {big}"));
        let mut stream = connect(&app).await;
        stream.write_all(&head(&headers)).await.unwrap();
        let got = answer(&mut stream).await;
        assert!(
            got.as_deref().is_some_and(|a| a.starts_with(expected)),
            "{headers:?}: {got:?}"
        );
    }
    assert_eq!(app.count("webhook_deliveries").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_spent_body_budget_is_503_with_retry_after_and_signed_deliveries_still_fit() {
    const BUDGET: usize = 1024 * 1024;
    let app = spawn_app_with(SECRET, |s| s.intake.body_budget_bytes = BUDGET, None).await;
    // A stranger with a well-formed signature starts a large body and
    // stalls: it holds most of the budget.
    let mut stalled = connect(&app).await;
    let mut request = head(&[
        "X-GitHub-Event: workflow_job".into(),
        "X-GitHub-Delivery: stalled".into(),
        format!("X-Hub-Signature-256: {}", forged()),
        "Content-Type: application/json".into(),
        "Content-Length: 900000".into(),
    ]);
    request.extend_from_slice(&[b' '; 1000]);
    stalled.write_all(&request).await.unwrap();
    app.eventually("the stalled body holds the budget", || async {
        app.state.body_budget.available() == BUDGET - 900_000
    })
    .await;

    // Another large body does not fit: refused at once, with a hint,
    // before any of it is sent.
    let mut crowded = connect(&app).await;
    crowded
        .write_all(&head(&[
            "X-GitHub-Event: workflow_job".into(),
            "X-GitHub-Delivery: crowded".into(),
            format!("X-Hub-Signature-256: {}", forged()),
            "Content-Type: application/json".into(),
            "Content-Length: 200000".into(),
        ]))
        .await
        .unwrap();
    let got = answer(&mut crowded).await.unwrap_or_default();
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(
        got.to_ascii_lowercase().contains("\r\nretry-after: "),
        "{got}"
    );

    // A real delivery (a few KiB) still fits beside them.
    let res = app
        .deliver("workflow_job", "real-1", &job_payload("queued", 7001, KANI))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(app.count("workflow_jobs").await, 1);

    // The stalled body's bytes come back when its sender goes away.
    drop(stalled);
    app.eventually("the budget is whole again", || async {
        app.state.body_budget.available() == BUDGET
    })
    .await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(
            r#"spot_runners_webhooks_total{action="",event="workflow_job",outcome="unavailable"} 1"#
        ),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_half_sent_head_is_closed_after_the_header_read_timeout() {
    let app = spawn_app_with(
        SECRET,
        |s| s.intake.header_read_timeout = Duration::from_millis(300),
        None,
    )
    .await;
    let mut stream = connect(&app).await;
    stream
        .write_all(b"POST /webhook HTTP/1.1\r\nHost: spot-runners\r\nX-GitHub-Event: wor")
        .await
        .unwrap();
    // Closed (with or without a 408): anything but silence.
    let got = answer(&mut stream).await;
    assert!(
        got.as_deref()
            .is_some_and(|a| a.is_empty() || a.starts_with("HTTP/1.1 408")),
        "{got:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_body_that_stops_coming_is_cut_off_after_the_body_read_timeout() {
    let app = spawn_app_with(
        SECRET,
        |s| s.intake.body_read_timeout = Duration::from_millis(300),
        None,
    )
    .await;
    let mut stream = connect(&app).await;
    let mut request = head(&[
        "X-GitHub-Event: workflow_job".into(),
        "X-GitHub-Delivery: slow".into(),
        format!("X-Hub-Signature-256: {}", forged()),
        "Content-Type: application/json".into(),
        "Content-Length: 1000".into(),
    ]);
    request.extend_from_slice(b"{\"action\"");
    stream.write_all(&request).await.unwrap();
    let got = answer(&mut stream).await;
    assert!(
        got.as_deref()
            .is_some_and(|a| a.starts_with("HTTP/1.1 408")),
        "{got:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn connections_past_the_limit_wait_for_a_free_one() {
    let app = spawn_app_with(
        SECRET,
        |s| {
            s.intake.max_connections = 2;
            s.intake.header_read_timeout = Duration::from_secs(60);
        },
        None,
    )
    .await;
    // Two connections that send nothing take both places.
    let first = connect(&app).await;
    let _second = connect(&app).await;
    let client = reqwest::Client::new();
    let url = format!("{}/healthz", app.base);
    let third = tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "answered past the connection limit");
    drop(first);
    let status = tokio::time::timeout(PATIENCE, third)
        .await
        .expect("answered once a connection closed")
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn database_errors_are_logged_not_sent_to_the_caller() {
    let app = spawn_app_with(SECRET, |_| {}, None).await;
    sqlx::query("ALTER TABLE webhook_deliveries RENAME TO webhook_deliveries_gone")
        .execute(app.db.store.pool())
        .await
        .unwrap();
    let res = app
        .deliver("workflow_job", "e-1", &job_payload("queued", 7101, KANI))
        .await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let text = res.text().await.unwrap();
    assert!(text.contains("not recorded"), "{text}");
    for internal in ["webhook_deliveries", "relation", "database"] {
        assert!(!text.contains(internal), "{internal} leaked: {text}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_service_without_a_webhook_secret_refuses_to_start() {
    let db = spot_runners_store::testing::test_database().await.unwrap();
    let mut settings = common::settings(&db, SECRET);
    settings.webhook_secrets = None;
    let metrics = std::sync::Arc::new(spot_runners::metrics::Metrics::new().unwrap());
    let err = spot_runners::startup::Application::build_with(settings, metrics, None)
        .await
        .err()
        .expect("no secret, no service");
    assert!(
        err.to_string().contains("SPOT_RUNNERS_WEBHOOK_SECRET"),
        "{err}"
    );
}
