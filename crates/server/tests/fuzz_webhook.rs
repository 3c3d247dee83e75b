//! Property test of `POST /webhook` over headers, signatures and bodies:
//! whatever arrives is answered with a clear 2xx/4xx, never a server
//! error, and nothing unsigned is stored.

mod common;

use common::{job_payload, spawn_app, SECRET};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use spot_runners_domain::webhook::sign;

#[derive(Clone, Debug)]
enum Sig {
    Valid,
    Forged,
    Garbage(String),
    Missing,
}

#[derive(Clone)]
struct Case {
    event: Option<String>,
    delivery: Option<String>,
    content_type: Option<&'static str>,
    sig: Sig,
    body: Vec<u8>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("event", &self.event)
            .field("delivery", &self.delivery)
            .field("content_type", &self.content_type)
            .field("sig", &self.sig)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let fields: &'static [&'static str] = &[
        "/action",
        "/workflow_job/name",
        "/workflow_job/workflow_name",
        "/workflow_job/labels/0",
        "/workflow_job/runner_name",
        "/workflow_job/conclusion",
        "/repository/full_name",
        "/organization/login",
    ];
    prop_oneof![
        // The real shape with one text field holding anything, NUL and
        // control characters included.
        (
            proptest::sample::select(fields),
            "[\\x00-\\x7f\\u{80}-\\u{2ff}]{0,10}",
            proptest::sample::select(&["queued", "in_progress", "completed", "waiting"][..]),
            1..1_000_000i64,
        )
            .prop_map(|(field, text, action, id)| {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&job_payload(action, id, &["self-hosted", "kani"]))
                        .unwrap();
                if let Some(slot) = v.pointer_mut(field) {
                    *slot = text.into();
                }
                serde_json::to_vec(&v).unwrap()
            }),
        proptest::collection::vec(any::<u8>(), 0..256),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::option::of(prop_oneof![
            Just("workflow_job".to_owned()),
            Just("ping".to_owned()),
            "[ -~]{0,16}",
        ]),
        proptest::option::of("[ -~]{0,40}"),
        proptest::option::of(proptest::sample::select(
            &[
                "application/json",
                "application/x-www-form-urlencoded",
                "text/plain",
            ][..],
        )),
        prop_oneof![
            Just(Sig::Valid),
            Just(Sig::Forged),
            "[ -~]{0,80}".prop_map(Sig::Garbage),
            Just(Sig::Missing),
        ],
        body(),
    )
        .prop_map(|(event, delivery, content_type, sig, body)| Case {
            event,
            delivery,
            content_type,
            sig,
            body,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_delivery_gets_a_clear_answer_and_unsigned_ones_store_nothing() {
    let app = spawn_app().await;
    let handle = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(Config {
        cases: 128,
        ..Config::default()
    });
    let result = tokio::task::block_in_place(|| {
        runner
            .run(&case(), |c| {
                handle.block_on(async {
                    let mut req = app.client.post(format!("{}/webhook", app.base));
                    for (name, value) in [
                        ("x-github-event", c.event.clone()),
                        ("x-github-delivery", c.delivery.clone()),
                        ("content-type", c.content_type.map(str::to_owned)),
                        (
                            "x-hub-signature-256",
                            match &c.sig {
                                Sig::Valid => Some(sign(SECRET.as_bytes(), &c.body)),
                                Sig::Forged => Some(sign(b"guess", &c.body)),
                                Sig::Garbage(g) => Some(g.clone()),
                                Sig::Missing => None,
                            },
                        ),
                    ] {
                        if let Some(v) = value {
                            req = req.header(name, v.trim().to_owned());
                        }
                    }
                    let before = app.count("workflow_jobs").await;
                    let res = req
                        .body(c.body.clone())
                        .send()
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let status = res.status().as_u16();
                    prop_assert!(
                        matches!(status, 200 | 202 | 400 | 401 | 413),
                        "{status} for {c:?}: {}",
                        res.text().await.unwrap_or_default()
                    );
                    let event = c.event.as_deref().map(str::trim);
                    if matches!(event, Some("workflow_job" | "ping"))
                        && !matches!(c.sig, Sig::Valid)
                    {
                        prop_assert_eq!(status, 401, "{:?}", c);
                    }
                    if status != 202 || !matches!(c.sig, Sig::Valid) {
                        prop_assert_eq!(app.count("workflow_jobs").await, before, "{:?}", c);
                    }
                    Ok(())
                })
            })
            // The failing case, shrunk, as text: the runner's error is large.
            .map_err(|e| e.to_string())
    });
    app.stop().await;
    if let Err(e) = result {
        panic!("{e}");
    }
}
